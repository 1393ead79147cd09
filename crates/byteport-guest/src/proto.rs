//! The guest protocol: frames and messages exchanged between the host and the
//! in-guest agent over a virtio-serial port.
//!
//! Owns the wire format only: encoding, a streaming decoder that copes with
//! partial reads, and the JSON payload types. It does no I/O of its own beyond
//! the [`write_frame`] helper over any [`std::io::Write`].
//!
//! A frame is `[u32 BE len][u32 BE stream][u8 kind][payload]`, where `len`
//! counts stream, kind and payload. Payloads are at most [`MAX_PAYLOAD`]
//! bytes; a larger length is rejected before anything is allocated.
//!
//! Stream 0 carries control messages (Hello, Ready, Ping, Pong); each exec
//! uses its own stream id, chosen by the host. JSON payloads ignore unknown
//! fields so that either side can grow them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_PORT_NAME: &str = "org.byteport.agent.0";

/// Largest payload one frame may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The stream that carries control messages.
pub const CONTROL_STREAM: u32 = 0;

/// Bytes before the payload: length, stream, kind.
const HEADER_LEN: usize = 9;

/// What a frame carries; decides how its payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// host→guest, stream 0: asks the guest to (re)send Ready.
    Hello,
    /// guest→host, stream 0: JSON [`Ready`].
    Ready,
    /// host→guest: JSON [`ExecRequest`], starts a process on a new stream.
    ExecStart,
    /// host→guest: bytes for the process's stdin.
    Stdin,
    /// host→guest: closes the process's stdin.
    StdinEof,
    /// guest→host: bytes the process wrote to stdout.
    Stdout,
    /// guest→host: bytes the process wrote to stderr.
    Stderr,
    /// guest→host: JSON [`Exit`]; the last frame of a stream.
    Exit,
    /// guest→host: JSON [`ExecError`]; the process could not run. Last frame of a stream.
    ExecError,
    /// host→guest: JSON [`Kill`]; signals the process.
    Kill,
    /// Either way, stream 0: the payload is echoed back in a Pong.
    Ping,
    /// Answer to a Ping, same payload.
    Pong,
    /// A kind this version does not know; receivers skip it.
    Unknown(u8),
}

impl Kind {
    /// The kind for a wire byte.
    pub fn from_u8(b: u8) -> Kind {
        match b {
            0x01 => Kind::Hello,
            0x02 => Kind::Ready,
            0x10 => Kind::ExecStart,
            0x11 => Kind::Stdin,
            0x12 => Kind::StdinEof,
            0x13 => Kind::Stdout,
            0x14 => Kind::Stderr,
            0x15 => Kind::Exit,
            0x16 => Kind::ExecError,
            0x17 => Kind::Kill,
            0x20 => Kind::Ping,
            0x21 => Kind::Pong,
            other => Kind::Unknown(other),
        }
    }

    /// The wire byte for this kind.
    pub fn as_u8(self) -> u8 {
        match self {
            Kind::Hello => 0x01,
            Kind::Ready => 0x02,
            Kind::ExecStart => 0x10,
            Kind::Stdin => 0x11,
            Kind::StdinEof => 0x12,
            Kind::Stdout => 0x13,
            Kind::Stderr => 0x14,
            Kind::Exit => 0x15,
            Kind::ExecError => 0x16,
            Kind::Kill => 0x17,
            Kind::Ping => 0x20,
            Kind::Pong => 0x21,
            Kind::Unknown(b) => b,
        }
    }
}

/// Why a frame or payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A payload over [`MAX_PAYLOAD`] bytes.
    #[error("frame payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge { len: usize },
    /// A length field too small to hold stream and kind.
    #[error("frame length {len} is shorter than its header")]
    Truncated { len: u32 },
    /// A JSON payload that does not parse as the kind says.
    #[error("bad {kind:?} payload")]
    Payload {
        kind: Kind,
        #[source]
        source: serde_json::Error,
    },
    /// A frame kind this version cannot turn into a [`Message`].
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
}

/// One frame. Its payload is never over [`MAX_PAYLOAD`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    stream: u32,
    kind: Kind,
    payload: Vec<u8>,
}

impl Frame {
    /// A frame, refusing payloads over [`MAX_PAYLOAD`].
    pub fn new(stream: u32, kind: Kind, payload: Vec<u8>) -> Result<Frame, ProtoError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge { len: payload.len() });
        }
        Ok(Frame {
            stream,
            kind,
            payload,
        })
    }

    /// A frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(stream: u32, kind: Kind, value: &T) -> Result<Frame, ProtoError> {
        let payload =
            serde_json::to_vec(value).map_err(|source| ProtoError::Payload { kind, source })?;
        Frame::new(stream, kind, payload)
    }

    /// The stream this frame belongs to (0 for control messages).
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// What the frame carries.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The raw payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload, consuming the frame.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// The payload parsed as JSON.
    pub fn parse_json<T: DeserializeOwned>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtoError::Payload {
            kind: self.kind,
            source,
        })
    }
}

/// The bytes of one frame on the wire.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + frame.payload.len());
    encode_into(frame, &mut out);
    out
}

/// Appends the bytes of one frame to `out`.
pub fn encode_into(frame: &Frame, out: &mut Vec<u8>) {
    // Cannot overflow: Frame::new keeps the payload under MAX_PAYLOAD.
    let len = (HEADER_LEN - 4 + frame.payload.len()) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&frame.stream.to_be_bytes());
    out.push(frame.kind.as_u8());
    out.extend_from_slice(&frame.payload);
}

/// Writes one frame with a single `write_all` so concurrent writers that
/// serialize on a lock never interleave partial frames.
pub fn write_frame<W: std::io::Write + ?Sized>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    w.write_all(&encode(frame))?;
    w.flush()
}

/// A streaming decoder: feed it whatever a read returned, take out whole frames.
///
/// After an error the byte stream is out of step and cannot be trusted;
/// [`Decoder::reset`] it and start again at a known boundary (a new connection).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        // Drop consumed bytes before growing, so the buffer stays near one frame.
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > MAX_PAYLOAD {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        if (len as usize) < HEADER_LEN - 4 {
            return Err(ProtoError::Truncated { len });
        }
        let payload_len = len as usize - (HEADER_LEN - 4);
        if payload_len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge { len: payload_len });
        }
        if avail.len() < HEADER_LEN + payload_len {
            return Ok(None);
        }
        let stream = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]);
        let kind = Kind::from_u8(avail[8]);
        let payload = avail[HEADER_LEN..HEADER_LEN + payload_len].to_vec();
        self.start += HEADER_LEN + payload_len;
        Ok(Some(Frame {
            stream,
            kind,
            payload,
        }))
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Forgets everything buffered.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
}

/// Sent by the guest at start and on every Hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The agent's version.
    pub version: String,
    /// The guest's hostname.
    pub hostname: String,
    /// Guest uptime when this was sent.
    pub uptime_ms: u64,
    /// Names this run of the agent (boot id and pid): a different value on
    /// the same connection means the agent restarted and its processes are gone.
    #[serde(default)]
    pub instance: String,
    /// Where cloud-init is on this boot, read from its files by the agent
    /// itself (no process started). Absent from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitStatus>,
}

/// Where cloud-init is in the guest on this boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudInitStatus {
    /// Enabled and not finished.
    Running,
    /// Finished every stage without errors.
    Done,
    /// Finished with errors.
    Error,
    /// Not installed, or disabled on this boot.
    Absent,
}

/// Where cloud-init keeps the state of the current boot (a tmpfs).
pub const CLOUD_INIT_RUN: &str = "/run/cloud-init";

impl CloudInitStatus {
    /// Reads cloud-init's run directory (normally [`CLOUD_INIT_RUN`]).
    ///
    /// Its systemd generator leaves `enabled` or `disabled` there before
    /// any unit starts, and its last stage writes `result.json` with the
    /// errors of the run. No directory means no cloud-init.
    pub fn read(run_dir: &std::path::Path) -> CloudInitStatus {
        if let Ok(json) = std::fs::read(run_dir.join("result.json"))
            && let Some(s) = CloudInitStatus::from_result(&json)
        {
            return s;
        }
        if !run_dir.is_dir() || run_dir.join("disabled").exists() {
            return CloudInitStatus::Absent;
        }
        CloudInitStatus::Running
    }

    /// cloud-init's `result.json`: `{"v1": {"datasource": ..., "errors":
    /// [...]}}`. None if it cannot be read (half written: look again).
    pub fn from_result(json: &[u8]) -> Option<CloudInitStatus> {
        let v: serde_json::Value = serde_json::from_slice(json).ok()?;
        let errors = v.get("v1")?.get("errors")?.as_array()?;
        Some(if errors.is_empty() {
            CloudInitStatus::Done
        } else {
            CloudInitStatus::Error
        })
    }
}

/// A process to start in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the agent's PATH.
    /// Empty with `set_clock` or `identity`: the agent applies them, starts
    /// nothing and answers with exit code 0.
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's (`/`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Whether the host will send stdin; when false the process reads /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Set the guest's clock to this time (seconds and nanoseconds since
    /// the Unix epoch) before starting: a VM woken from a snapshot has the
    /// snapshot's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_clock: Option<(i64, u32)>,
    /// Give the guest this boot id (a UUID) and machine id (32 hex digits)
    /// before starting, once per agent: every clone of a snapshot wakes
    /// with the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<(String, String)>,
}

impl ExecRequest {
    /// A request to run `argv` with no stdin.
    pub fn new<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..ExecRequest::default()
        }
    }
}

/// Asks the guest to signal a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kill {
    /// The signal number (9 = SIGKILL, 15 = SIGTERM).
    pub signal: i32,
}

/// How a process ended: an exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit code when the process exited.
    pub code: Option<i32>,
    /// Signal number when a signal killed the process.
    pub signal: Option<i32>,
}

/// Why the guest could not run a process (for example, command not found).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecError {
    /// A human-readable reason.
    pub message: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello,
    Ready(Ready),
    ExecStart(ExecRequest),
    Stdin(Vec<u8>),
    StdinEof,
    Kill(Kill),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(Exit),
    ExecError(ExecError),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

impl Message {
    /// The frame kind that carries this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello => Kind::Hello,
            Message::Ready(_) => Kind::Ready,
            Message::ExecStart(_) => Kind::ExecStart,
            Message::Stdin(_) => Kind::Stdin,
            Message::StdinEof => Kind::StdinEof,
            Message::Kill(_) => Kind::Kill,
            Message::Stdout(_) => Kind::Stdout,
            Message::Stderr(_) => Kind::Stderr,
            Message::Exit(_) => Kind::Exit,
            Message::ExecError(_) => Kind::ExecError,
            Message::Ping(_) => Kind::Ping,
            Message::Pong(_) => Kind::Pong,
        }
    }

    /// This message as a frame on `stream`.
    pub fn into_frame(self, stream: u32) -> Result<Frame, ProtoError> {
        let kind = self.kind();
        match self {
            Message::Hello | Message::StdinEof => Frame::new(stream, kind, Vec::new()),
            Message::Stdin(b)
            | Message::Stdout(b)
            | Message::Stderr(b)
            | Message::Ping(b)
            | Message::Pong(b) => Frame::new(stream, kind, b),
            Message::Ready(v) => Frame::json(stream, kind, &v),
            Message::ExecStart(v) => Frame::json(stream, kind, &v),
            Message::Kill(v) => Frame::json(stream, kind, &v),
            Message::Exit(v) => Frame::json(stream, kind, &v),
            Message::ExecError(v) => Frame::json(stream, kind, &v),
        }
    }

    /// The message a frame carries.
    pub fn from_frame(frame: Frame) -> Result<Message, ProtoError> {
        Ok(match frame.kind {
            Kind::Hello => Message::Hello,
            Kind::StdinEof => Message::StdinEof,
            Kind::Ready => Message::Ready(frame.parse_json()?),
            Kind::ExecStart => Message::ExecStart(frame.parse_json()?),
            Kind::Kill => Message::Kill(frame.parse_json()?),
            Kind::Exit => Message::Exit(frame.parse_json()?),
            Kind::ExecError => Message::ExecError(frame.parse_json()?),
            Kind::Stdin => Message::Stdin(frame.payload),
            Kind::Stdout => Message::Stdout(frame.payload),
            Kind::Stderr => Message::Stderr(frame.payload),
            Kind::Ping => Message::Ping(frame.payload),
            Kind::Pong => Message::Pong(frame.payload),
            Kind::Unknown(b) => return Err(ProtoError::UnknownKind(b)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_init_status_comes_from_its_run_directory() {
        let tmp = std::env::temp_dir().join(format!("bp-ci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let read = || CloudInitStatus::read(&tmp);
        assert_eq!(read(), CloudInitStatus::Absent, "no directory");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("disabled"), "").unwrap();
        assert_eq!(read(), CloudInitStatus::Absent, "disabled");
        std::fs::remove_file(tmp.join("disabled")).unwrap();
        std::fs::write(tmp.join("enabled"), "").unwrap();
        assert_eq!(read(), CloudInitStatus::Running);
        std::fs::write(tmp.join("result.json"), r#"{"v1": {"datas"#).unwrap();
        assert_eq!(read(), CloudInitStatus::Running, "half written");
        std::fs::write(
            tmp.join("result.json"),
            r#"{"v1": {"datasource": "DataSourceNoCloudNet", "errors": []}}"#,
        )
        .unwrap();
        assert_eq!(read(), CloudInitStatus::Done);
        std::fs::write(
            tmp.join("result.json"),
            r#"{"v1": {"datasource": null, "errors": ["('scripts_user', RuntimeError())"]}}"#,
        )
        .unwrap();
        assert_eq!(read(), CloudInitStatus::Error);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    fn samples() -> Vec<(u32, Message)> {
        vec![
            (0, Message::Hello),
            (
                0,
                Message::Ready(Ready {
                    version: "0.1.0".into(),
                    hostname: "tiny".into(),
                    uptime_ms: 3600,
                    instance: "b00t-42".into(),
                    cloud_init: Some(CloudInitStatus::Running),
                }),
            ),
            (
                7,
                Message::ExecStart(ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                    env: vec![("A".into(), "b".into())],
                    cwd: Some("/tmp".into()),
                    stdin: true,
                    set_clock: Some((1_700_000_000, 5)),
                    identity: Some((
                        "0b7c4a57-2f43-4e8e-9a36-1c5d0f0e6d21".into(),
                        "0b7c4a572f434e8e9a361c5d0f0e6d21".into(),
                    )),
                }),
            ),
            (7, Message::Stdin(b"input".to_vec())),
            (7, Message::StdinEof),
            (7, Message::Kill(Kill { signal: 15 })),
            (7, Message::Stdout(vec![0, 1, 2, 255])),
            (7, Message::Stderr(Vec::new())),
            (
                7,
                Message::Exit(Exit {
                    code: Some(3),
                    signal: None,
                }),
            ),
            (
                8,
                Message::ExecError(ExecError {
                    message: "not found".into(),
                }),
            ),
            (0, Message::Ping(b"1234".to_vec())),
            (0, Message::Pong(b"1234".to_vec())),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (stream, msg) in samples() {
            let frame = msg.clone().into_frame(stream).unwrap();
            let bytes = encode(&frame);
            let mut d = Decoder::new();
            d.push(&bytes);
            let got = d.next_frame().unwrap().expect("a whole frame");
            assert_eq!(got.stream(), stream);
            assert_eq!(Message::from_frame(got).unwrap(), msg);
            assert!(d.next_frame().unwrap().is_none());
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn wire_layout_is_as_documented() {
        let frame = Frame::new(0x0102_0304, Kind::Stdout, b"ab".to_vec()).unwrap();
        assert_eq!(encode(&frame), [0, 0, 0, 7, 1, 2, 3, 4, 0x13, b'a', b'b']);
        let exit = Message::Exit(Exit {
            code: None,
            signal: Some(9),
        })
        .into_frame(1)
        .unwrap();
        assert_eq!(exit.payload(), br#"{"code":null,"signal":9}"#);
        let req = Message::ExecStart(ExecRequest {
            env: vec![("K".into(), "V".into())],
            ..ExecRequest::new(["true"])
        })
        .into_frame(1)
        .unwrap();
        assert_eq!(
            req.payload(),
            br#"{"argv":["true"],"env":[["K","V"]],"stdin":false}"#
        );
    }

    #[test]
    fn frames_split_at_every_byte_boundary() {
        let mut bytes = Vec::new();
        let msgs = samples();
        for (stream, msg) in &msgs {
            encode_into(&msg.clone().into_frame(*stream).unwrap(), &mut bytes);
        }
        for chunk in 1..=bytes.len() {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push((f.stream(), Message::from_frame(f).unwrap()));
                }
            }
            assert_eq!(got, msgs, "chunk size {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn oversize_frames_are_refused_before_reading_the_payload() {
        assert!(matches!(
            Frame::new(1, Kind::Stdout, vec![0; MAX_PAYLOAD + 1]),
            Err(ProtoError::TooLarge { len }) if len == MAX_PAYLOAD + 1
        ));
        assert!(Frame::new(1, Kind::Stdout, vec![0; MAX_PAYLOAD]).is_ok());

        let mut d = Decoder::new();
        // Only the header arrives: the length alone is enough to refuse it.
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_frame(), Err(ProtoError::TooLarge { .. })));

        let mut d = Decoder::new();
        d.push(&((MAX_PAYLOAD + 6) as u32).to_be_bytes());
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::TooLarge { len }) if len == MAX_PAYLOAD + 1
        ));
    }

    #[test]
    fn short_length_is_an_error() {
        let mut d = Decoder::new();
        d.push(&[0, 0, 0, 4, 0, 0, 0, 0]);
        assert!(matches!(
            d.next_frame(),
            Err(ProtoError::Truncated { len: 4 })
        ));
        d.reset();
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn max_size_frames_stream_through_a_bounded_buffer() {
        let frame = Frame::new(3, Kind::Stdout, vec![7; MAX_PAYLOAD]).unwrap();
        let bytes = encode(&frame);
        let mut d = Decoder::new();
        for _ in 0..20 {
            for piece in bytes.chunks(4096) {
                d.push(piece);
                if let Some(f) = d.next_frame().unwrap() {
                    assert_eq!(f, frame);
                }
            }
            assert!(d.buf.capacity() <= 4 * bytes.len());
        }
    }

    #[test]
    fn unknown_kinds_decode_as_frames_but_not_messages() {
        let frame = Frame::new(0, Kind::from_u8(0x7f), b"x".to_vec()).unwrap();
        let mut d = Decoder::new();
        d.push(&encode(&frame));
        let got = d.next_frame().unwrap().unwrap();
        assert_eq!(got.kind(), Kind::Unknown(0x7f));
        assert!(matches!(
            Message::from_frame(got),
            Err(ProtoError::UnknownKind(0x7f))
        ));
    }

    #[test]
    fn payloads_tolerate_unknown_and_missing_fields() {
        let f = Frame::new(
            2,
            Kind::ExecStart,
            br#"{"argv":["ls"],"future":1}"#.to_vec(),
        )
        .unwrap();
        assert_eq!(
            Message::from_frame(f).unwrap(),
            Message::ExecStart(ExecRequest::new(["ls"]))
        );
        let bad = Frame::new(2, Kind::Exit, b"{".to_vec()).unwrap();
        assert!(matches!(
            Message::from_frame(bad),
            Err(ProtoError::Payload {
                kind: Kind::Exit,
                ..
            })
        ));
    }

    #[test]
    fn kind_bytes_round_trip() {
        for b in 0..=u8::MAX {
            assert_eq!(Kind::from_u8(b).as_u8(), b);
        }
    }
}
