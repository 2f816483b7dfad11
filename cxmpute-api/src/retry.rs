//! `Retry-After`, read the same way by the host (a busy node) and the client
//! (a busy host).

use std::time::Duration;

use crate::types::Timestamp;

/// A `Retry-After` header as a duration from `now`: delta-seconds or an
/// HTTP date (IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`). A date in
/// the past is zero; anything unreadable is `None`.
pub fn retry_after(headers: &http::HeaderMap, now: Timestamp) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    let at = i64::try_from(at.as_millis()).ok()?;
    Some(Duration::from_millis(
        u64::try_from(at.saturating_sub(now.millis())).unwrap_or(0),
    ))
}
