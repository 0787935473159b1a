//! A parser for `text/event-stream` as the HTML standard defines it, fed with the chunks of
//! a response as they arrive: lines of `field: value`, an empty line ending each event,
//! comments (keep-alives) starting with `:`.

/// The longest line accepted; the daemon's events are a few KB, so anything this long is not
/// the daemon speaking.
const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, `message` when absent.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field when this event set one.
    pub id: Option<String>,
}

/// Why the stream cannot be read as server-sent events.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    /// A line grew past [`MAX_LINE_BYTES`] without ending.
    #[error("a line of the event stream is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
}

/// Collects fields across chunks until an empty line dispatches them.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: Vec<String>,
    id: Option<String>,
    /// A chunk ended with `\r`: a `\n` starting the next one belongs to the same line end.
    after_cr: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `chunk` and returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        for &byte in chunk {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_ended(&String::from_utf8_lossy(&line)) {
                        events.push(event);
                    }
                }
                _ => {
                    if self.line.len() >= MAX_LINE_BYTES {
                        return Err(SseError::LineTooLong);
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(events)
    }

    fn line_ended(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => self.data.push(value.to_owned()),
            // An id with a NUL is ignored, as the standard says.
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        let id = self.id.take();
        if self.data.is_empty() {
            // No data: nothing is dispatched, but an id still counts as the last one seen.
            return id.map(|id| SseEvent {
                event: String::new(),
                data: String::new(),
                id: Some(id),
            });
        }
        let data = std::mem::take(&mut self.data).join("\n");
        Some(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_are_put_together() {
        let mut parser = SseParser::new();
        let stream = "id: 17\nevent: cluster.updated\ndata: {\"a\":1}\n\n: keep-alive\n\n\
                      event: resync\ndata: {\"reason\":\"x\"}\r\n\r\n";
        let mut events = Vec::new();
        for chunk in stream.as_bytes().chunks(3) {
            events.extend(parser.feed(chunk).expect("well-formed"));
        }
        assert_eq!(
            events,
            [
                SseEvent {
                    event: "cluster.updated".into(),
                    data: "{\"a\":1}".into(),
                    id: Some("17".into())
                },
                SseEvent {
                    event: "resync".into(),
                    data: "{\"reason\":\"x\"}".into(),
                    id: None
                },
            ]
        );
    }

    #[test]
    fn data_lines_join_and_an_event_without_a_name_is_a_message() {
        let mut parser = SseParser::new();
        let events = parser
            .feed(b"data:one\ndata: two\n\n")
            .expect("well-formed");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, "message");
        assert_eq!(events[0].data, "one\ntwo");
    }

    #[test]
    fn an_endless_line_is_an_error() {
        let mut parser = SseParser::new();
        let chunk = vec![b'x'; 1024 * 1024];
        let result = (0..5).try_for_each(|_| parser.feed(&chunk).map(drop));
        assert!(matches!(result, Err(SseError::LineTooLong)));
    }
}
