//! Sending sign-in codes: the [`Mailer`] trait and the console mailer.

use async_trait::async_trait;

use crate::error::Result;
use crate::secret::Secret;

/// Sends sign-in codes to people.
#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    /// Sends `code` to `email`.
    async fn send_login_code(&self, email: &str, code: &Secret) -> Result<()>;
}

/// A mailer for development: logs that a code was sent, and the code itself
/// only when built with [`ConsoleMailer::revealing`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsoleMailer {
    reveal: bool,
}

impl ConsoleMailer {
    /// Logs only that a code was sent.
    pub fn new() -> Self {
        ConsoleMailer { reveal: false }
    }

    /// Also prints the code (local development only: codes are secrets).
    pub fn revealing() -> Self {
        ConsoleMailer { reveal: true }
    }
}

#[async_trait]
impl Mailer for ConsoleMailer {
    async fn send_login_code(&self, email: &str, code: &Secret) -> Result<()> {
        if self.reveal {
            println!("sign-in code for {email}: {}", code.expose());
        } else {
            tracing::info!(%email, "sign-in code sent (console mailer; codes hidden)");
        }
        Ok(())
    }
}
