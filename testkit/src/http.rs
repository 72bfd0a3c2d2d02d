//! The one HTTP/1.1 reader of the kit: the receiver reads requests with it
//! (plain and TLS), the benchmark's polling relay reads responses with it.
//! Content-Length bodies only: nothing that talks to it sends chunks.

use std::collections::HashMap;
use std::io::BufRead;

/// A request or a response, as read off a connection.
#[derive(Debug, Clone)]
pub struct Message {
    /// The request line or the status line, without its line end.
    pub start: String,
    /// Lower-cased names, trimmed values.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Message {
    /// For a response: whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        self.start.starts_with("HTTP/1.1 2")
    }
}

/// Read one message. `None` when the connection closed before one began,
/// broke off in the middle of one, or sent something that is not HTTP.
pub fn read_message(reader: &mut impl BufRead) -> Option<Message> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let start = line.trim_end_matches(['\r', '\n']).to_string();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Message { start, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_requests_and_responses_back_to_back() {
        let wire = b"POST /hooks HTTP/1.1\r\nContent-Type: application/json\r\ncontent-length: 2\r\n\r\n{}\
                     HTTP/1.1 204 No Content\r\n\r\n";
        let mut r = std::io::BufReader::new(&wire[..]);
        let req = read_message(&mut r).unwrap();
        assert_eq!(req.start, "POST /hooks HTTP/1.1");
        assert_eq!(req.headers["content-type"], "application/json");
        assert_eq!(req.body, b"{}");
        let resp = read_message(&mut r).unwrap();
        assert!(resp.is_success() && resp.body.is_empty());
        assert!(read_message(&mut r).is_none());
    }

    #[test]
    fn a_cut_message_is_none() {
        for wire in [&b"GET / HTTP/1.1\r\nhost: x\r\n"[..], b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nab"] {
            assert!(read_message(&mut std::io::BufReader::new(wire)).is_none());
        }
    }
}
