//! The host's log: a line per call at INFO, cheap enough to leave on.
//!
//! A call copies its line into a shared buffer that a thread of its own
//! writes out ([`BatchedStdout`]), so it never waits on stdout. On a
//! terminal the lines are tracing's own, coloured; anywhere else they are
//! written by [`PlainLine`], which writes the same layout without the
//! colouring machinery and with every control character of a value
//! escaped (a node's or caller's text cannot forge a line or drive a
//! terminal). `--log-json` writes tracing's JSON lines.

use std::fmt::{self, Write as _};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::BoxError;

/// Installs the global subscriber: `filter` is a tracing filter
/// (`info`, `cxmpute_core=debug,info`...), `json` asks for JSON lines.
/// The guard writes what is left when dropped, at exit.
pub(crate) fn init(filter: &str, json: bool) -> Result<BatchGuard, BoxError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("bad --log filter `{filter}`: {e}"))?;
    let (writer, guard) = BatchedStdout::start()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(LogTime)
        .with_writer(move || writer.clone());
    if json {
        builder.json().init();
    } else if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        builder.with_ansi(true).init();
    } else {
        builder
            .with_ansi(false)
            .fmt_fields(PlainFields)
            .event_format(PlainLine)
            .init();
    }
    Ok(guard)
}

/// The time of a log line, as tracing's default writes it (RFC 3339, UTC,
/// microseconds: `2026-12-07T08:43:33.123456Z`), with the date and time of
/// day made once a second per thread rather than for every line: the
/// calendar arithmetic and formatting were a fifth of the cost of the line
/// a call logs.
struct LogTime;

impl FormatTime for LogTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        thread_local! {
            /// The second last written, and its text up to the dot.
            static SECOND: std::cell::RefCell<(u64, String)> =
                const { std::cell::RefCell::new((u64::MAX, String::new())) };
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        SECOND.with(|second| {
            let mut second = second.borrow_mut();
            if second.0 != secs {
                let day = cxmpute::core::types::Day(i32::try_from(secs / 86_400).unwrap_or(0));
                let (y, m, d) = day.ymd();
                let t = secs % 86_400;
                second.1.clear();
                write!(
                    second.1,
                    "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.",
                    t / 3600,
                    t % 3600 / 60,
                    t % 60
                )?;
                second.0 = secs;
            }
            w.write_str(&second.1)?;
            // Six digits and the zone, without the formatting machinery.
            let mut micros = now.subsec_micros();
            let mut digits = [b'0', b'0', b'0', b'0', b'0', b'0', b'Z'];
            for d in digits[..6].iter_mut().rev() {
                *d = b'0' + (micros % 10) as u8;
                micros /= 10;
            }
            w.write_str(std::str::from_utf8(&digits).unwrap_or("000000Z"))
        })
    }
}

/// A line as tracing's default format lays it out, uncoloured:
/// `TIME LEVEL span{fields}:span{fields}: target: message name=value ...`.
///
/// The default format, even uncoloured, passes every part through its
/// colouring wrappers and every value through an escaping formatter; this
/// one writes the parts straight into the line and escapes only values
/// that hold a control character. It escapes more than the default does:
/// every control character, line breaks included, so no value can start a
/// line of its own.
pub(crate) struct PlainLine;

impl<S, N> FormatEvent<S, N> for PlainLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LogTime.format_time(&mut w)?;
        let meta = event.metadata();
        w.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                w.write_str(span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(w, "{{{fields}}}")?;
                    }
                }
                w.write_char(':')?;
            }
            w.write_char(' ')?;
        }
        w.write_str(meta.target())?;
        w.write_str(": ")?;
        let mut fields = Fields::new(&mut w);
        event.record(&mut fields);
        fields.result?;
        w.write_char('\n')
    }
}

/// Span fields in [`PlainLine`]'s form (`name=value`, space-separated).
pub(crate) struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, mut w: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Fields::new(&mut w);
        fields.record(&mut v);
        v.result
    }
}

/// Writes the fields it visits: the message as it is, the others as
/// ` name=value`, each value escaped where it holds a control character.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    /// Whether nothing was written yet (no space before the first field).
    first: bool,
    result: fmt::Result,
}

impl<'a, 'w> Fields<'a, 'w> {
    fn new(w: &'a mut Writer<'w>) -> Self {
        Fields {
            w,
            first: true,
            result: Ok(()),
        }
    }

    /// Writes the separator and `name=` (nothing for the message).
    fn name(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.w.write_char(' ')?;
        }
        if field.name() != "message" {
            // Raw identifiers (`r#type`) are named without their prefix.
            let name = field.name();
            self.w.write_str(name.strip_prefix("r#").unwrap_or(name))?;
            self.w.write_char('=')?;
        }
        Ok(())
    }

    fn put(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'w>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.name(field).and_then(|()| value(self.w));
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |w| escaped(w, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| {
            let mut digits = [0u8; 20];
            w.write_str(decimal(value, &mut digits))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |w| {
            if value < 0 {
                w.write_char('-')?;
            }
            let mut digits = [0u8; 20];
            w.write_str(decimal(value.unsigned_abs(), &mut digits))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, |w| write!(Escaping(w), "{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields arrive here too, their `Debug` being their `Display`.
        self.put(field, |w| write!(Escaping(w), "{value:?}"));
    }
}

/// The decimal digits of `n`, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// Writes `s`, each control character (C0, DEL, C1: line breaks and
/// terminal escapes among them) as an escape.
fn escaped(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // The common case, checked on bytes: no byte below a space, no DEL, and
    // no 0xC2 (which begins every C1 character in UTF-8).
    if !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
        return w.write_str(s);
    }
    let mut rest = s;
    while let Some(i) = rest.find(|c: char| c.is_control()) {
        w.write_str(&rest[..i])?;
        let c = rest[i..].chars().next().unwrap_or_default();
        match c {
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c => write!(w, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[i + c.len_utf8()..];
    }
    w.write_str(rest)
}

/// A writer that escapes what is written to it, as [`escaped`] does.
struct Escaping<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escaped(self.0, s)
    }
}

/// Log lines gathered in memory and written to stdout by a thread of their
/// own, every [`BatchedStdout::EVERY`] or as soon as
/// [`BatchedStdout::WRITE_AT`] bytes wait. A call pays for its line a lock
/// and a copy, never a system call nor a thread wake-up. (A channel-based
/// writer, tried first, woke its thread for every line: the profile of a
/// busy host showed that wake-up as a tenth of its CPU.) Lines beyond
/// [`BatchedStdout::MOST`] waiting bytes are dropped rather than let a
/// stalled stdout grow the host's memory or hold calls up.
#[derive(Clone)]
struct BatchedStdout(std::sync::Arc<Batch>);

struct Batch {
    lines: std::sync::Mutex<Vec<u8>>,
    wake: std::sync::Condvar,
    stop: std::sync::atomic::AtomicBool,
}

/// Writes what is left and stops the writer thread when dropped.
pub(crate) struct BatchGuard(BatchedStdout, Option<std::thread::JoinHandle<()>>);

impl BatchedStdout {
    const EVERY: Duration = Duration::from_millis(50);
    const WRITE_AT: usize = 256 << 10;
    const MOST: usize = 16 << 20;

    fn start() -> std::io::Result<(BatchedStdout, BatchGuard)> {
        let w = BatchedStdout(std::sync::Arc::new(Batch {
            lines: std::sync::Mutex::new(Vec::with_capacity(Self::WRITE_AT)),
            wake: std::sync::Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        }));
        let b = w.0.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                use std::io::Write;
                use std::sync::atomic::Ordering;
                // Two buffers swap places, so neither is allocated again.
                let mut out = Vec::with_capacity(Self::WRITE_AT);
                loop {
                    let stopping = {
                        let lines = b.lines.lock().unwrap_or_else(|p| p.into_inner());
                        let (mut lines, _) = b
                            .wake
                            .wait_timeout_while(lines, Self::EVERY, |l| {
                                l.len() < Self::WRITE_AT && !b.stop.load(Ordering::Relaxed)
                            })
                            .unwrap_or_else(|p| p.into_inner());
                        std::mem::swap(&mut *lines, &mut out);
                        b.stop.load(Ordering::Relaxed)
                    };
                    if !out.is_empty() {
                        let mut stdout = std::io::stdout().lock();
                        let _ = stdout.write_all(&out).and_then(|()| stdout.flush());
                        out.clear();
                    }
                    if stopping {
                        break;
                    }
                }
            })?;
        Ok((w.clone(), BatchGuard(w, Some(thread))))
    }
}

impl std::io::Write for BatchedStdout {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut lines = self.0.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() + line.len() <= Self::MOST {
            lines.extend_from_slice(line);
            if lines.len() >= Self::WRITE_AT {
                self.0.wake.notify_one();
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        (self.0)
            .0
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        (self.0).0.wake.notify_one();
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a subscriber with [`PlainLine`] writes while `f` runs.
    fn lines(f: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::INFO)
            .with_ansi(false)
            .fmt_fields(PlainFields)
            .event_format(PlainLine)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line after its timestamp, which is checked for its shape.
    fn after_time(line: &str) -> &str {
        let (time, rest) = line.split_at(27);
        let b = time.as_bytes();
        for (i, c) in b.iter().enumerate() {
            let want_digit = !matches!(i, 4 | 7 | 10 | 13 | 16 | 19 | 26);
            assert_eq!(c.is_ascii_digit(), want_digit, "{time}");
        }
        assert_eq!((b[4], b[10], b[19], b[26]), (b'-', b'T', b'.', b'Z'));
        rest
    }

    #[test]
    fn a_line_has_the_default_layout_without_colour() {
        let out = lines(|| {
            tracing::info!(
                request_id = "req_1",
                route = %"/v1/chat/completions",
                node = None::<&str>,
                latency_ms = 12u64,
                delta = -3i64,
                cache_hit = false,
                "request settled"
            );
            tracing::debug!("below the level");
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert_eq!(
            after_time(&out),
            "  INFO host::log::tests: request settled request_id=req_1 \
             route=/v1/chat/completions latency_ms=12 delta=-3 cache_hit=false\n"
        );
    }

    #[test]
    fn control_characters_in_values_are_escaped() {
        let model = "evil\x1b[31m\nFAKE  INFO line\r\x07\u{9b}end";
        let out = lines(|| {
            tracing::warn!(model, shown = %model, debugged = ?model, "a {} message", "multi\nline");
        });
        assert_eq!(
            out.lines().count(),
            1,
            "one line, whatever the values hold: {out}"
        );
        let escaped = r"evil\u{1b}[31m\nFAKE  INFO line\r\u{7}\u{9b}end";
        assert_eq!(
            after_time(&out),
            format!(
                "  WARN host::log::tests: a multi\\nline message model={escaped} \
                 shown={escaped} debugged=\"evil\\u{{1b}}[31m\\nFAKE  INFO line\\r\\u{{7}}\\u{{9b}}end\"\n"
            )
        );
    }

    #[test]
    fn spans_and_their_fields_lead_the_line() {
        let out = lines(|| {
            let outer = tracing::info_span!("http", method = "GET", path = "/v1/models");
            let _o = outer.enter();
            let inner = tracing::info_span!("step");
            let _i = inner.enter();
            tracing::error!(code = 7u64, "failed");
        });
        assert_eq!(
            after_time(&out),
            " ERROR http{method=GET path=/v1/models}:step: host::log::tests: failed code=7\n"
        );
    }

    #[test]
    fn numbers_are_written_in_full() {
        let mut buf = [0u8; 20];
        assert_eq!(decimal(0, &mut buf), "0");
        assert_eq!(decimal(u64::MAX, &mut buf), "18446744073709551615");
        let out = lines(|| tracing::info!(min = i64::MIN, max = u64::MAX, "n"));
        assert!(
            out.ends_with("n min=-9223372036854775808 max=18446744073709551615\n"),
            "{out}"
        );
    }
}
