//! Sending sign-in codes and account alerts: the [`Mailer`] trait, the
//! console mailer, the SMTP mailer (feature `smtp`) and [`MailerConfig`] to
//! pick one from flags.

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::secret::Secret;
use crate::types::{BudgetPeriod, Credits};

/// Sends sign-in codes and account alerts to people.
#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    /// Sends `code` to `email`.
    async fn send_login_code(&self, email: &str, code: &Secret) -> Result<()>;

    /// Sends an account alert to `email`. By default only logged, so a
    /// mailer written for sign-in codes alone keeps working.
    async fn send_alert(&self, email: &str, alert: &AlertMail) -> Result<()> {
        tracing::info!(%email, subject = alert.subject(), "account alert (not mailed by this mailer)");
        Ok(())
    }
}

/// An email an account asked for with its alerts (`User::alerts`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AlertMail {
    /// The balance fell below the account's threshold.
    BalanceBelow {
        /// The balance now.
        balance: Credits,
        /// The threshold.
        threshold: Credits,
    },
    /// The account budget's spending this period reached its share of the limit.
    BudgetReached {
        /// Spent (or held by calls under way) this period.
        spent: Credits,
        /// The budget's limit.
        limit: Credits,
        /// The share asked for, in percent.
        percent: u8,
        /// The budget's period.
        period: BudgetPeriod,
    },
}

impl AlertMail {
    /// The subject line.
    pub fn subject(&self) -> &'static str {
        match self {
            AlertMail::BalanceBelow { .. } => "Your Cxmpute balance is low",
            AlertMail::BudgetReached { .. } => "Your Cxmpute budget is nearly used",
        }
    }

    /// The plain-text body (CRLF line ends, as mail wants them).
    pub fn text(&self) -> String {
        let credits = |c: Credits| format!("{}.{:06}", c.0 / 1_000_000, (c.0 % 1_000_000).abs());
        match self {
            AlertMail::BalanceBelow { balance, threshold } => format!(
                "Your Cxmpute balance is {} credits,\r\n\
                 below the {} credits you asked to be told of.\r\n\r\n\
                 Calls stop when it runs out: add credits to keep them going.\r\n\
                 You will not be mailed again until the balance has been back\r\n\
                 above the threshold.\r\n",
                credits(*balance),
                credits(*threshold)
            ),
            AlertMail::BudgetReached {
                spent,
                limit,
                percent,
                period,
            } => format!(
                "Your Cxmpute account has spent {} credits this {},\r\n\
                 {}% or more of its budget of {} credits a {}.\r\n\r\n\
                 Calls past the budget are refused until the next {} starts (UTC).\r\n",
                credits(*spent),
                period.as_str(),
                percent,
                credits(*limit),
                period.as_str(),
                period.as_str()
            ),
        }
    }
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

    async fn send_alert(&self, email: &str, alert: &AlertMail) -> Result<()> {
        tracing::info!(%email, subject = alert.subject(), "account alert sent (console mailer)");
        Ok(())
    }
}

/// How SMTP connections are secured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text (a relay on loopback or a private network only).
    None,
    /// Plain connection upgraded with `STARTTLS`, which is required (default port 587).
    #[default]
    StartTls,
    /// TLS from the first byte (SMTPS, default port 465).
    Tls,
}

impl SmtpTls {
    /// The usual port for this mode.
    pub const fn default_port(self) -> u16 {
        match self {
            SmtpTls::None => 25,
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
        }
    }
}

impl std::str::FromStr for SmtpTls {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "plain" | "off" => Ok(SmtpTls::None),
            "starttls" => Ok(SmtpTls::StartTls),
            "tls" | "smtps" | "wrapper" => Ok(SmtpTls::Tls),
            other => Err(Error::InvalidInput(format!(
                "unknown SMTP TLS mode `{other}` (none, starttls or tls)"
            ))),
        }
    }
}

/// Where and how to send mail over SMTP.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SmtpConfig {
    /// The relay's host name (also the name its TLS certificate must carry).
    pub host: String,
    /// Its port; `None` is the usual port of [`SmtpConfig::tls`].
    pub port: Option<u16>,
    /// How the connection is secured.
    pub tls: SmtpTls,
    /// The sender, e.g. `Cxmpute <no-reply@example.com>`.
    pub from: String,
    /// Login name, if the relay wants one.
    pub username: Option<String>,
    /// Password for [`SmtpConfig::username`] (redacted in `Debug`).
    pub password: Option<Secret>,
    /// Connect and command timeout.
    pub timeout: std::time::Duration,
}

impl SmtpConfig {
    /// A relay at `host` with STARTTLS on the usual port, no login.
    pub fn new(host: impl Into<String>, from: impl Into<String>) -> Self {
        SmtpConfig {
            host: host.into(),
            port: None,
            tls: SmtpTls::StartTls,
            from: from.into(),
            username: None,
            password: None,
            timeout: std::time::Duration::from_secs(15),
        }
    }

    /// Sets the port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Sets the TLS mode.
    pub fn tls(mut self, tls: SmtpTls) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the login.
    pub fn credentials(mut self, username: impl Into<String>, password: Secret) -> Self {
        self.username = Some(username.into());
        self.password = Some(password);
        self
    }
}

/// Which mailer a host runs, read from flags or the environment; see
/// [`MailerConfig::from_env`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailerConfig {
    /// The [`ConsoleMailer`]; `reveal_codes` prints codes (local development only).
    Console {
        /// Print the codes themselves.
        reveal_codes: bool,
    },
    /// The SMTP mailer (feature `smtp`).
    Smtp(SmtpConfig),
}

impl MailerConfig {
    /// Reads the mailer settings from the process environment:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CXMPUTE_MAILER` | `console` (default) or `smtp` |
    /// | `CXMPUTE_MAIL_REVEAL_CODES` | `1`: the console mailer prints codes |
    /// | `CXMPUTE_SMTP_HOST` | relay host (required for `smtp`) |
    /// | `CXMPUTE_SMTP_PORT` | port (default by TLS mode: 25, 587, 465) |
    /// | `CXMPUTE_SMTP_TLS` | `none`, `starttls` (default) or `tls` |
    /// | `CXMPUTE_SMTP_FROM` | sender address (required for `smtp`) |
    /// | `CXMPUTE_SMTP_USERNAME`, `CXMPUTE_SMTP_PASSWORD` | login, both or neither |
    /// | `CXMPUTE_SMTP_TIMEOUT_SECS` | connect and command timeout (default 15) |
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`MailerConfig::from_env`], reading variables through `get`
    /// (a host's flags, a config file, a test).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let kind = var("CXMPUTE_MAILER").unwrap_or_else(|| "console".into());
        match kind.to_ascii_lowercase().as_str() {
            "console" => Ok(MailerConfig::Console {
                reveal_codes: var("CXMPUTE_MAIL_REVEAL_CODES")
                    .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes")),
            }),
            "smtp" => {
                let missing = |k: &str| Error::InvalidInput(format!("{k} is required for SMTP"));
                let host = var("CXMPUTE_SMTP_HOST").ok_or_else(|| missing("CXMPUTE_SMTP_HOST"))?;
                let from = var("CXMPUTE_SMTP_FROM").ok_or_else(|| missing("CXMPUTE_SMTP_FROM"))?;
                let mut c = SmtpConfig::new(host, from);
                if let Some(t) = var("CXMPUTE_SMTP_TLS") {
                    c.tls = t.parse()?;
                }
                if let Some(p) = var("CXMPUTE_SMTP_PORT") {
                    c.port = Some(p.parse().map_err(|_| {
                        Error::InvalidInput(format!("CXMPUTE_SMTP_PORT `{p}` is not a port"))
                    })?);
                }
                if let Some(t) = var("CXMPUTE_SMTP_TIMEOUT_SECS") {
                    let secs: u64 = t.parse().map_err(|_| {
                        Error::InvalidInput(format!(
                            "CXMPUTE_SMTP_TIMEOUT_SECS `{t}` is not a number"
                        ))
                    })?;
                    c.timeout = std::time::Duration::from_secs(secs.max(1));
                }
                // Read raw: a password may have meaningful spaces.
                match (var("CXMPUTE_SMTP_USERNAME"), get("CXMPUTE_SMTP_PASSWORD")) {
                    (Some(u), Some(p)) if !p.is_empty() => {
                        c.username = Some(u);
                        c.password = Some(Secret::new(p));
                    }
                    (None, None) => {}
                    (None, Some(p)) if p.is_empty() => {}
                    _ => {
                        return Err(Error::InvalidInput(
                            "set both CXMPUTE_SMTP_USERNAME and CXMPUTE_SMTP_PASSWORD, or neither"
                                .into(),
                        ))
                    }
                }
                Ok(MailerConfig::Smtp(c))
            }
            other => Err(Error::InvalidInput(format!(
                "unknown mailer `{other}` (console or smtp)"
            ))),
        }
    }

    /// Builds the mailer. `InvalidInput` for a bad address, or for SMTP in a
    /// build without the `smtp` feature.
    pub fn build(&self) -> Result<std::sync::Arc<dyn Mailer>> {
        match self {
            MailerConfig::Console { reveal_codes: true } => {
                Ok(std::sync::Arc::new(ConsoleMailer::revealing()))
            }
            MailerConfig::Console {
                reveal_codes: false,
            } => Ok(std::sync::Arc::new(ConsoleMailer::new())),
            #[cfg(feature = "smtp")]
            MailerConfig::Smtp(c) => Ok(std::sync::Arc::new(SmtpMailer::new(c)?)),
            #[cfg(not(feature = "smtp"))]
            MailerConfig::Smtp(_) => Err(Error::InvalidInput(
                "this build has no SMTP mailer: enable the `smtp` feature".into(),
            )),
        }
    }
}

#[cfg(feature = "smtp")]
pub use smtp::SmtpMailer;

#[cfg(feature = "smtp")]
mod smtp {
    use async_trait::async_trait;
    use lettre::message::header::ContentType;
    use lettre::message::Mailbox;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    use super::{AlertMail, Mailer, SmtpConfig, SmtpTls};
    use crate::error::{Error, Result};
    use crate::secret::Secret;

    /// Sends sign-in codes through an SMTP relay (lettre, rustls), one
    /// connection per mail: codes are few, and without a pool the mailer owns
    /// no background task, so it can be built and dropped anywhere.
    pub struct SmtpMailer {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
        relay: String,
    }

    impl std::fmt::Debug for SmtpMailer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            // The transport holds the relay password: never print it.
            f.debug_struct("SmtpMailer")
                .field("relay", &self.relay)
                .field("from", &self.from.to_string())
                .finish_non_exhaustive()
        }
    }

    impl SmtpMailer {
        /// A mailer for the relay in `c`. Nothing is sent (or connected) yet.
        pub fn new(c: &SmtpConfig) -> Result<Self> {
            let from: Mailbox = c.from.parse().map_err(|e| {
                Error::InvalidInput(format!("the sender `{}` is not an address: {e}", c.from))
            })?;
            let port = c.port.unwrap_or(c.tls.default_port());
            let tls = match c.tls {
                SmtpTls::None => Tls::None,
                SmtpTls::StartTls | SmtpTls::Tls => {
                    let params = TlsParameters::new(c.host.clone()).map_err(|e| {
                        Error::InvalidInput(format!("TLS settings for {}: {e}", c.host))
                    })?;
                    if c.tls == SmtpTls::Tls {
                        Tls::Wrapper(params)
                    } else {
                        Tls::Required(params)
                    }
                }
            };
            let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(c.host.clone())
                .port(port)
                .tls(tls)
                .timeout(Some(c.timeout));
            match (&c.username, &c.password) {
                (Some(u), Some(p)) => {
                    b = b.credentials(Credentials::new(u.clone(), p.expose().to_owned()));
                }
                (None, None) => {}
                _ => {
                    return Err(Error::InvalidInput(
                        "an SMTP login needs both a username and a password".into(),
                    ))
                }
            }
            Ok(SmtpMailer {
                transport: b.build(),
                from,
                relay: format!("{}:{port}", c.host),
            })
        }
    }

    /// The mail: the code in the body only (subjects travel through more
    /// logs and notification previews than bodies do).
    fn message(from: &Mailbox, to: &str, code: &Secret) -> Result<Message> {
        let body = format!(
            "Your Cxmpute sign-in code: {}\r\n\r\n\
             It works once and expires in a few minutes. If you did not ask for it,\r\n\
             ignore this mail: nobody can sign in without the code.\r\n",
            code.expose()
        );
        plain_text(from, to, "Your Cxmpute sign-in code", body)
    }

    /// An account alert, plain text like the sign-in mail.
    fn alert_message(from: &Mailbox, to: &str, alert: &AlertMail) -> Result<Message> {
        plain_text(from, to, alert.subject(), alert.text())
    }

    /// A plain-text mail from the platform to an account's address.
    fn plain_text(from: &Mailbox, to: &str, subject: &str, body: String) -> Result<Message> {
        let to: Mailbox = to
            .parse()
            .map_err(|_| Error::InvalidInput("`email` is not a deliverable address".into()))?;
        // Relays and spam filters expect a Message-ID; the sender's domain
        // names it, as RFC 5322 suggests.
        let id = format!(
            "<{}@{}>",
            crate::secret::random_token(24),
            from.email.domain()
        );
        Message::builder()
            .message_id(Some(id))
            .from(from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| Error::backend("building a mail", e))
    }

    impl SmtpMailer {
        async fn deliver(&self, msg: Message) -> Result<()> {
            match self.transport.send(msg).await {
                Ok(_) => Ok(()),
                // A permanent refusal of the recipient is the caller's input.
                Err(e) if e.is_permanent() => Err(Error::InvalidInput(
                    "the mail server refused this address".into(),
                )),
                Err(e) => Err(Error::unavailable(
                    format!("sending mail through {}", self.relay),
                    e,
                )),
            }
        }
    }

    #[async_trait]
    impl Mailer for SmtpMailer {
        async fn send_alert(&self, email: &str, alert: &AlertMail) -> Result<()> {
            self.deliver(alert_message(&self.from, email, alert)?).await
        }

        async fn send_login_code(&self, email: &str, code: &Secret) -> Result<()> {
            let msg = message(&self.from, email, code)?;
            self.deliver(msg).await
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> Result<MailerConfig> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        MailerConfig::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn mailer_settings_are_read_and_checked() {
        assert_eq!(
            lookup(&[]).unwrap(),
            MailerConfig::Console {
                reveal_codes: false
            }
        );
        assert_eq!(
            lookup(&[("CXMPUTE_MAIL_REVEAL_CODES", "1")]).unwrap(),
            MailerConfig::Console { reveal_codes: true }
        );
        let c = lookup(&[
            ("CXMPUTE_MAILER", "smtp"),
            ("CXMPUTE_SMTP_HOST", "mail.example.com"),
            ("CXMPUTE_SMTP_FROM", "Cxmpute <no-reply@example.com>"),
            ("CXMPUTE_SMTP_TLS", "tls"),
            ("CXMPUTE_SMTP_USERNAME", "me"),
            ("CXMPUTE_SMTP_PASSWORD", " pass word "),
        ])
        .unwrap();
        let MailerConfig::Smtp(c) = c else {
            panic!("an SMTP config")
        };
        assert_eq!(
            (c.tls, c.port, c.tls.default_port()),
            (SmtpTls::Tls, None, 465)
        );
        assert_eq!(c.password.as_ref().map(Secret::expose), Some(" pass word "));
        assert!(!format!("{c:?}").contains("pass word"));
        for bad in [
            &[("CXMPUTE_MAILER", "pigeon")][..],
            &[("CXMPUTE_MAILER", "smtp"), ("CXMPUTE_SMTP_HOST", "h")][..],
            &[
                ("CXMPUTE_MAILER", "smtp"),
                ("CXMPUTE_SMTP_HOST", "h"),
                ("CXMPUTE_SMTP_FROM", "a@b.io"),
                ("CXMPUTE_SMTP_PORT", "99999"),
            ][..],
            &[
                ("CXMPUTE_MAILER", "smtp"),
                ("CXMPUTE_SMTP_HOST", "h"),
                ("CXMPUTE_SMTP_FROM", "a@b.io"),
                ("CXMPUTE_SMTP_USERNAME", "me"),
            ][..],
            &[
                ("CXMPUTE_MAILER", "smtp"),
                ("CXMPUTE_SMTP_HOST", "h"),
                ("CXMPUTE_SMTP_FROM", "a@b.io"),
                ("CXMPUTE_SMTP_TLS", "maybe"),
            ][..],
        ] {
            assert!(lookup(bad).is_err(), "{bad:?}");
        }
    }

    #[cfg(feature = "smtp")]
    #[test]
    fn a_bad_sender_is_refused_when_the_mailer_is_built() {
        let c = SmtpConfig::new("mail.example.com", "not an address");
        assert!(matches!(
            MailerConfig::Smtp(c).build(),
            Err(Error::InvalidInput(_))
        ));
    }
}
