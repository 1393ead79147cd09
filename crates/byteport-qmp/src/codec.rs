//! The QMP wire format: one JSON object per line in each direction.
//!
//! QEMU sends a greeting (`{"QMP": ...}`), replies (`{"return": ...}` or
//! `{"error": ...}`, echoing the command's `id`) and events (`{"event": ...}`);
//! the client sends `{"execute": ..., "arguments": ..., "id": ...}`. No I/O here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::QmpError;

/// The greeting QEMU sends as soon as a client connects.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Greeting {
    pub version: Version,
    /// Optional protocol capabilities offered (e.g. `oob`); this client enables none.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// QEMU's version as the greeting reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Version {
    pub qemu: QemuVersion,
    /// The distribution's package string, e.g. `Debian 1:7.2+dfsg-7`.
    #[serde(default)]
    pub package: String,
}

/// `major.minor.micro` of the QEMU binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// An asynchronous event such as `SHUTDOWN`, `STOP`, `RESUME`, `RESET`,
/// `POWERDOWN` or `GUEST_PANICKED`.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The event's name, e.g. `SHUTDOWN`.
    pub name: String,
    /// The event's `data` member; [`Value::Null`] when QEMU sends none.
    pub data: Value,
    /// `(seconds, microseconds)` since the Unix epoch, as QEMU stamped it.
    pub timestamp: Option<(i64, i64)>,
}

/// One message from QEMU.
#[derive(Debug)]
pub(crate) enum Message {
    Greeting(Greeting),
    /// `id` is `None` when QEMU sent none or one this client could not have sent.
    Reply {
        id: Option<u64>,
        result: Result<Value, QmpError>,
    },
    Event(Event),
}

#[derive(Serialize)]
struct Command<'a> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a Value>,
    id: u64,
}

#[derive(Deserialize)]
struct WireError {
    class: String,
    desc: String,
}

#[derive(Deserialize)]
struct WireTimestamp {
    seconds: i64,
    microseconds: i64,
}

/// Encodes a command as one line, newline included.
pub(crate) fn encode_command(command: &str, arguments: Option<&Value>, id: u64) -> Vec<u8> {
    let mut line = serde_json::to_vec(&Command {
        execute: command,
        arguments,
        id,
    })
    // Strings, JSON values and integers always serialize.
    .expect("a QMP command serializes");
    line.push(b'\n');
    line
}

/// Parses one line (without its line ending) from QEMU.
pub(crate) fn parse_message(line: &str) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("invalid JSON ({e}): {}", excerpt(line))))?;
    let Value::Object(mut object) = value else {
        return Err(QmpError::Protocol(format!(
            "expected a JSON object: {}",
            excerpt(line)
        )));
    };
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(ret) = object.remove("return") {
        return Ok(Message::Reply {
            id,
            result: Ok(ret),
        });
    }
    if let Some(error) = object.remove("error") {
        let WireError { class, desc } = from_member("error", error)?;
        return Ok(Message::Reply {
            id,
            result: Err(QmpError::Command { class, desc }),
        });
    }
    if let Some(name) = object.remove("event") {
        return parse_event(name, object).map(Message::Event);
    }
    if let Some(greeting) = object.remove("QMP") {
        return from_member("QMP", greeting).map(Message::Greeting);
    }
    Err(QmpError::Protocol(format!(
        "neither a reply, an event nor a greeting: {}",
        excerpt(line)
    )))
}

fn parse_event(name: Value, mut object: Map<String, Value>) -> Result<Event, QmpError> {
    let Value::String(name) = name else {
        return Err(QmpError::Protocol(format!(
            "event name is not a string: {name}"
        )));
    };
    let timestamp = match object.remove("timestamp") {
        None => None,
        Some(value) => {
            let WireTimestamp {
                seconds,
                microseconds,
            } = from_member("timestamp", value)?;
            Some((seconds, microseconds))
        }
    };
    Ok(Event {
        name,
        data: object.remove("data").unwrap_or(Value::Null),
        timestamp,
    })
}

fn from_member<T: serde::de::DeserializeOwned>(member: &str, value: Value) -> Result<T, QmpError> {
    serde_json::from_value(value).map_err(|e| QmpError::Protocol(format!("bad `{member}`: {e}")))
}

/// Bounds how much of a bad line ends up in an error message.
fn excerpt(line: &str) -> &str {
    const MAX: usize = 200;
    match line.char_indices().nth(MAX) {
        Some((end, _)) => &line[..end],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn encodes_with_and_without_arguments() {
        let line = encode_command("stop", None, 7);
        assert_eq!(line, b"{\"execute\":\"stop\",\"id\":7}\n");
        let args = json!({"device": "virtio0"});
        let line = encode_command("eject", Some(&args), 8);
        let value: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            json!({"execute": "eject", "arguments": {"device": "virtio0"}, "id": 8})
        );
        assert_eq!(line.last(), Some(&b'\n'));
    }

    #[test]
    fn parses_a_real_greeting() {
        let line = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
        let Message::Greeting(greeting) = parse_message(line).unwrap() else {
            panic!("not a greeting");
        };
        assert_eq!(
            greeting.version.qemu,
            QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            }
        );
        assert_eq!(greeting.capabilities, ["oob"]);
    }

    #[test]
    fn parses_replies() {
        let Message::Reply { id, result } =
            parse_message(r#"{"return": {"status": "running"}, "id": 3}"#).unwrap()
        else {
            panic!("not a reply");
        };
        assert_eq!(id, Some(3));
        assert_eq!(result.unwrap(), json!({"status": "running"}));

        let line = r#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#;
        let Message::Reply { id, result } = parse_message(line).unwrap() else {
            panic!("not a reply");
        };
        assert_eq!(id, Some(4));
        match result {
            Err(QmpError::Command { class, desc }) => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command nope has not been found");
            }
            other => panic!("unexpected {other:?}"),
        }

        // An id this client could not have sent does not match any call.
        let Message::Reply { id, .. } = parse_message(r#"{"return": {}, "id": "x"}"#).unwrap()
        else {
            panic!("not a reply");
        };
        assert_eq!(id, None);
    }

    #[test]
    fn parses_events_with_and_without_data() {
        let line = r#"{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;
        let Message::Event(event) = parse_message(line).unwrap() else {
            panic!("not an event");
        };
        assert_eq!(event.name, "SHUTDOWN");
        assert_eq!(event.data["reason"], "guest-shutdown");
        assert_eq!(event.timestamp, Some((1_700_000_000, 12)));

        let Message::Event(event) = parse_message(r#"{"event": "STOP"}"#).unwrap() else {
            panic!("not an event");
        };
        assert_eq!(event.data, Value::Null);
        assert_eq!(event.timestamp, None);
    }

    #[test]
    fn rejects_what_is_not_qmp() {
        for line in [
            "not json",
            "[1, 2]",
            r#"{"hello": 1}"#,
            r#"{"error": "flat"}"#,
            r#"{"event": 5}"#,
        ] {
            assert!(
                matches!(parse_message(line), Err(QmpError::Protocol(_))),
                "{line}"
            );
        }
    }

    #[test]
    fn excerpt_cuts_long_lines_on_a_char_boundary() {
        let long = "é".repeat(500);
        assert_eq!(excerpt(&long).chars().count(), 200);
        assert_eq!(excerpt("short"), "short");
    }
}
