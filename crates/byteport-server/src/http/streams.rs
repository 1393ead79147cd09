//! Handlers whose bodies stream: image file uploads and downloads, a VM's
//! serial console (tail and live WebSocket), exec (NDJSON lines), and the
//! node channel (a WebSocket each node agent opens).

use super::extract::{ApiJson, ApiQuery};
use crate::app::image_files::FileRole;
use crate::app::{App, Ctx};
use crate::error::{AppError, AppResult};
use axum::Json;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_types::api::*;
use byteport_types::node_proto::{FromNode, ToNode};
use futures_util::{SinkExt, StreamExt};
use tokio_util::io::ReaderStream;

/// Upload one file of an image (admins): `image` (the disk or initramfs),
/// `kernel` or `initrd`. The bytes must hash to the sha256 the image
/// declares; the image becomes `available` once it has every file.
#[utoipa::path(put, path = "/v1/images/{name}/files/{file}", tag = "catalog",
    params(("name" = String, Path), ("file" = String, Path, description = "image, kernel or initrd")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Image), (status = 400, body = ErrorBody)))]
pub async fn image_upload(
    State(app): State<App>,
    ctx: Ctx,
    Path((name, file)): Path<(String, String)>,
    body: Body,
) -> AppResult<Json<Image>> {
    let role: FileRole = file.parse()?;
    let stream = body.into_data_stream();
    Ok(Json(app.image_upload(&ctx, &name, role, stream).await?))
}

/// Download an image file by its sha256 (nodes fetch what they boot).
#[utoipa::path(get, path = "/v1/image-files/{sha256}", tag = "catalog",
    params(("sha256" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
pub async fn image_file_download(
    State(app): State<App>,
    ctx: Ctx,
    Path(sha256): Path<String>,
) -> AppResult<Response> {
    let (file, len) = app.image_file_open(&ctx, &sha256).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(ReaderStream::with_capacity(file, 256 * 1024)),
    )
        .into_response())
}

/// The end of a VM's serial console log, as text.
#[utoipa::path(get, path = "/v1/vms/{id}/console", tag = "vms",
    params(("id" = String, Path), ConsoleQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn vm_console(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> AppResult<Response> {
    let bytes = app.vm_console(&ctx, &id, q.bytes).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&bytes).into_owned(),
    )
        .into_response())
}

/// The largest message the console's WebSocket takes from a client.
const CONSOLE_MESSAGE_MAX: usize = 64 * 1024;

/// The live serial console over a WebSocket: binary messages from the
/// server carry the guest's output; text or binary messages sent to it are
/// typed into the console (members and above).
#[utoipa::path(get, path = "/v1/vms/{id}/console/ws", tag = "vms",
    params(("id" = String, Path)),
    responses((status = 101, description = "switching to the WebSocket protocol"), (status = 503, body = ErrorBody)))]
pub async fn vm_console_ws(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> AppResult<Response> {
    let stream = app.vm_console_attach(&ctx, &id).await?;
    // A console session is something a person did: audited when it opens
    // and when it closes.
    app.audit_record(&ctx, "vm_console_open", 101, "ok").await;
    // Keystrokes, not files: a message is at most 64 KiB.
    Ok(ws
        .max_message_size(CONSOLE_MESSAGE_MAX)
        .max_frame_size(CONSOLE_MESSAGE_MAX)
        .on_upgrade(move |socket| async move {
            console_bridge(socket, stream).await;
            app.audit_record(&ctx, "vm_console_close", 101, "ok").await;
        }))
}

async fn console_bridge(socket: WebSocket, mut s: crate::app::hub::Stream) {
    let (mut tx, mut rx) = socket.split();
    loop {
        tokio::select! {
            m = s.rx.recv() => match m {
                Some(FromNode::Console { data, .. }) => {
                    let Ok(b) = B64.decode(data) else { continue };
                    if !sent_in_time(&mut tx, Message::Binary(b.into())).await {
                        return;
                    }
                }
                Some(FromNode::Error { message, .. }) => {
                    let _ = tx.send(Message::Text(format!("\r\n[console: {message}]\r\n").into())).await;
                    return;
                }
                Some(_) => {}
                None => {
                    let _ = tx.send(Message::Close(None)).await;
                    return;
                }
            },
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    s.send(ToNode::Input { stream: s.id, data: B64.encode(t.as_bytes()) }).await;
                }
                Some(Ok(Message::Binary(b))) => {
                    s.send(ToNode::Input { stream: s.id, data: B64.encode(&b) }).await;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// Run a command in a running VM through its guest agent. The response is
/// `application/x-ndjson`: one [`ExecEvent`] per line, the last an `exit`
/// or an `error`.
#[utoipa::path(post, path = "/v1/vms/{id}/exec", tag = "vms",
    params(("id" = String, Path)), request_body = ExecRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = ExecEvent), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn vm_exec(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> AppResult<Response> {
    Ok(ndjson(app.vm_exec(&ctx, &id, req).await?))
}

/// Run a command on every VM of an environment at once (or those
/// `os_prefix` and `vm` select), its output streamed as it comes. The
/// response is `application/x-ndjson`: one [`EnvironmentExecEvent`] per
/// line, `started` first (the VMs), then each VM's output and its `exit`
/// or `error` (one VM's lines in order, different VMs' interleaved), and
/// `done` last. `POST .../run` gives the same gathered into one answer.
#[utoipa::path(post, path = "/v1/environments/{env}/exec", tag = "environments",
    params(("env" = String, Path, description = "id or name"), EnvironmentRunQuery),
    request_body = ExecRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = EnvironmentExecEvent), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn env_exec(
    State(app): State<App>,
    ctx: Ctx,
    Path(env): Path<String>,
    ApiQuery(q): ApiQuery<EnvironmentRunQuery>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> AppResult<Response> {
    let (_, rx) = app.env_exec(&ctx, &env, &q, req).await?;
    Ok(ndjson(rx))
}

/// An `application/x-ndjson` response: each message `rx` yields, as one
/// line of JSON, until it ends.
pub(super) fn ndjson<T: serde::Serialize + Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> Response {
    let lines = tokio_stream_from(rx).map(|ev| {
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// Write a file into a running VM through its guest agent: the body's
/// bytes replace `path`, and the answer is the guest's size and sha256 of
/// it (equal to those of the bytes sent, or the copy is an error).
#[utoipa::path(put, path = "/v1/vms/{id}/files", tag = "vms",
    params(("id" = String, Path), VmFileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileWritten), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn vm_file_put(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<VmFileQuery>,
    body: Body,
) -> AppResult<Json<FileWritten>> {
    Ok(Json(
        app.vm_file_put(&ctx, &id, &q.path, file_body(body)).await?,
    ))
}

/// A request body as the chunks a file copy takes; a broken body is a 400.
fn file_body(body: Body) -> impl futures_util::Stream<Item = AppResult<bytes::Bytes>> + Unpin {
    body.into_data_stream()
        .map(|c| c.map_err(|e| AppError::bad("invalid_body", e.to_string())))
}

/// Read a file of a running VM through its guest agent. The guest's
/// sha256 of it comes first, in the `x-byteport-sha256` header; a body
/// whose bytes do not hash to it ends in an error instead of completing.
#[utoipa::path(get, path = "/v1/vms/{id}/files", tag = "vms",
    params(("id" = String, Path), VmFileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn vm_file_get(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<VmFileQuery>,
) -> AppResult<Response> {
    let file = app.vm_file_get(&ctx, &id, &q.path).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::HeaderName::from_static("x-byteport-sha256"),
                file.sha256,
            ),
        ],
        Body::from_stream(tokio_stream_from(file.body)),
    )
        .into_response())
}

/// Write one file into every VM of an environment (or those `os_prefix`
/// and `vm` select) at once; each VM's result says its guest's sha256 of
/// it, or why it has none. The body is at most 64 MiB.
#[utoipa::path(put, path = "/v1/environments/{env}/files", tag = "environments",
    params(("env" = String, Path, description = "id or name"), EnvironmentFileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = EnvironmentFileResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn env_file_put(
    State(app): State<App>,
    ctx: Ctx,
    Path(env): Path<String>,
    ApiQuery(q): ApiQuery<EnvironmentFileQuery>,
    body: Body,
) -> AppResult<Json<EnvironmentFileResult>> {
    Ok(Json(
        app.env_file_put(&ctx, &env, &q, file_body(body)).await?,
    ))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The node channel: a node agent holds this WebSocket open so that the
/// control plane can reach it without dialing it (node credential only).
#[utoipa::path(get, path = "/v1/nodes/{id}/channel", tag = "nodes",
    params(("id" = String, Path)),
    responses((status = 101, description = "switching to the WebSocket protocol"), (status = 401, body = ErrorBody)))]
pub async fn node_channel(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> AppResult<Response> {
    let node = app.node_channel_auth(&ctx, &id)?;
    Ok(ws
        .max_message_size(4 << 20)
        .on_upgrade(move |socket| node_bridge(app, node, socket)))
}

/// How long one write to a WebSocket may take before its peer is taken for
/// gone (it stopped reading, or the network did).
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends one message; false when it failed or took over [`WRITE_TIMEOUT`].
async fn sent_in_time<S>(tx: &mut S, m: Message) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, tx.send(m)).await,
        Ok(Ok(()))
    )
}

async fn node_bridge(app: App, node: uuid::Uuid, socket: WebSocket) {
    let mut att = app.hub.attach(node);
    tracing::info!(%node, "node channel open");
    let (mut tx, mut rx) = socket.split();
    // Whatever changed while the node was away: heartbeat at once.
    let _ = tx
        .send(Message::Text(
            serde_json::to_string(&ToNode::Poke)
                .unwrap_or_default()
                .into(),
        ))
        .await;
    let mut ping = tokio::time::interval(std::time::Duration::from_secs(15));
    loop {
        tokio::select! {
            m = att.rx.recv() => {
                let Some(m) = m else { break };
                let Ok(text) = serde_json::to_string(&m) else { continue };
                if !sent_in_time(&mut tx, Message::Text(text.into())).await {
                    break;
                }
            }
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<FromNode>(&t) {
                    Ok(msg) => {
                        let stream = msg.stream();
                        if att.deliver(msg) {
                            app.hub.stuck_streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(%node, stream, "closed a stream whose reader fell behind");
                        }
                    }
                    Err(e) => tracing::warn!(%node, error = %e, "bad message on node channel"),
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if !sent_in_time(&mut tx, Message::Ping(Vec::new().into())).await {
                    break;
                }
            }
        }
    }
    app.hub.detach(node, att.conn);
    tracing::info!(%node, "node channel closed");
}

/// How long one event stream lasts; the browser then reconnects (and its
/// credential is checked again).
const EVENTS_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

/// Live changes as server-sent events: each event's `data` is one
/// [`Event`], the current record of a VM the caller may see (or, for
/// admins, of a node) that changed. A stream first sends a comment
/// (`: ready`) and a `retry` hint, then changes as they happen, a
/// keep-alive comment every 15 s, and ends after ten minutes (EventSource
/// reconnects by itself). Changes made by any control-plane replica on the
/// same database are seen within about a second. A stream that does not
/// read what it is sent ends early; a client that reconnects after a
/// break should read its lists again, since changes made meanwhile are
/// not replayed.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    responses((status = 200, content_type = "text/event-stream", body = Event,
        description = "a stream of server-sent events whose data is an Event"),
        (status = 401, body = ErrorBody)))]
pub async fn events(State(app): State<App>, ctx: Ctx) -> AppResult<Response> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use std::collections::VecDeque;
    let cursor = app.events_open(&ctx).await?;
    let until = tokio::time::Instant::now() + EVENTS_LIFETIME;
    struct St {
        app: App,
        cursor: crate::app::events::EventCursor,
        queue: VecDeque<SseEvent>,
    }
    let hello = SseEvent::default()
        .comment("ready")
        .retry(std::time::Duration::from_secs(1));
    let st = St {
        app,
        cursor,
        queue: VecDeque::from([hello]),
    };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(e), st));
            }
            let next = tokio::time::timeout_at(until, st.app.events_next(&mut st.cursor));
            // Past its lifetime, or too far behind the feed: the stream
            // ends and the client reconnects.
            let evs = next.await.ok().flatten()?;
            st.queue
                .extend(evs.iter().map(|d| SseEvent::default().data(&**d)));
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}
