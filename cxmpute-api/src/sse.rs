//! Server-sent events: an incremental decoder (lines may split anywhere
//! across network chunks).
//!
//! Shared by the host (to meter the streams it passes through) and
//! `cxmpute-client` (to turn streams into typed chunks).

/// One event: its `event:` name (if any) and its `data:` lines joined by `\n`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field.
    pub event: Option<String>,
    /// The `data:` lines, joined.
    pub data: String,
}

/// A line, or an event's data, longer than the decoder's cap: the peer sends
/// garbage or attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event line or event longer than {0} bytes")]
pub struct LineTooLong(pub usize);

/// Incremental SSE decoder. Feed it chunks as they arrive; it calls back once
/// per complete event.
#[derive(Debug)]
pub struct SseDecoder {
    line: Vec<u8>,
    event: SseEvent,
    has_data: bool,
    max_line: usize,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new(1 << 20)
    }
}

impl SseDecoder {
    /// A decoder refusing lines, and events whose data lines add up to,
    /// more than `max_line` bytes (an event is never held longer than that,
    /// however its lines come).
    pub fn new(max_line: usize) -> Self {
        SseDecoder {
            line: Vec::new(),
            event: SseEvent::default(),
            has_data: false,
            max_line,
        }
    }

    /// Decodes a chunk, calling `on_event` for each event it completes.
    pub fn push(
        &mut self,
        mut chunk: &[u8],
        on_event: &mut impl FnMut(SseEvent),
    ) -> Result<(), LineTooLong> {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = chunk.split_at(nl);
            chunk = &rest[1..];
            if self.line.is_empty() {
                self.line_done(head, on_event);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, on_event);
                self.line = line;
                self.line.clear();
            }
            if self.event.data.len() > self.max_line {
                return Err(LineTooLong(self.max_line));
            }
        }
        self.line.extend_from_slice(chunk);
        if self.line.len().saturating_add(self.event.data.len()) > self.max_line {
            return Err(LineTooLong(self.max_line));
        }
        Ok(())
    }

    /// Ends the input: an event not yet closed by a blank line is dispatched.
    pub fn finish(&mut self, on_event: &mut impl FnMut(SseEvent)) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, on_event);
        }
        self.dispatch(on_event);
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return; // comment / keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                if self.has_data {
                    self.event.data.push('\n');
                }
                self.event.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.event.event = Some(value.into_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(SseEvent)) {
        if self.has_data {
            on_event(std::mem::take(&mut self.event));
        }
        self.event = SseEvent::default();
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for c in chunks {
            d.push(c, &mut |e| out.push(e)).unwrap();
        }
        d.finish(&mut |e| out.push(e));
        out
    }

    #[test]
    fn events_split_at_every_byte_decode_the_same() {
        let text = b"data: {\"a\":1}\r\n\r\n: keep-alive\n\nevent: error\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        let whole = decode_all(&[text]);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0].data, "{\"a\":1}");
        assert_eq!(
            whole[1],
            SseEvent {
                event: Some("error".into()),
                data: "x\ny".into()
            }
        );
        assert_eq!(whole[2].data, "[DONE]");
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(decode_all(&bytes), whole);
        for split in 0..text.len() {
            let (a, b) = text.split_at(split);
            assert_eq!(decode_all(&[a, b]), whole, "split at {split}");
        }
    }

    #[test]
    fn endless_line_is_refused() {
        let mut d = SseDecoder::new(16);
        assert_eq!(d.push(&[b'x'; 17], &mut |_| {}), Err(LineTooLong(16)));
    }

    #[test]
    fn an_event_is_held_no_longer_than_the_cap_however_its_lines_come() {
        let mut d = SseDecoder::new(1024);
        let line = format!("data: {}\n", "A".repeat(100));
        let mut err = None;
        for _ in 0..20 {
            if let Err(e) = d.push(line.as_bytes(), &mut |_| {}) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(LineTooLong(1024)));
    }
}
