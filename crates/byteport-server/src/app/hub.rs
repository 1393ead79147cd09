//! The node hub: the control plane's end of each node's channel (a
//! WebSocket the node opened), and the streams multiplexed over it. A
//! console tail, a live console or an exec opens a stream; the node's
//! answers are routed back to whoever opened it. Nodes connected to another
//! control-plane replica are not reachable from this one.
//!
//! One task reads a node's channel for every stream on it, so it never
//! waits on one stream: a stream whose reader lets [`STREAM_QUEUE`]
//! answers pile up (a console client that does not read, say) is closed,
//! here and on the node, and the others go on.

use byteport_types::node_proto::{FromNode, ToNode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Messages queued towards one node before senders wait.
const NODE_QUEUE: usize = 256;
/// Answers queued for one stream before it is closed as stuck.
pub const STREAM_QUEUE: usize = 64;

type Streams = HashMap<u64, mpsc::Sender<FromNode>>;

struct Link {
    conn: u64,
    tx: mpsc::Sender<ToNode>,
    streams: Arc<Mutex<Streams>>,
}

/// Every node channel this replica holds.
#[derive(Default)]
pub struct NodeHub {
    links: Mutex<HashMap<Uuid, Link>>,
    next: AtomicU64,
    /// Streams closed because their reader fell behind.
    pub stuck_streams: AtomicU64,
}

/// The control plane's side of one node connection, held by the WebSocket
/// task: it sends what `rx` yields and hands what it reads to `deliver`.
pub struct Attached {
    pub conn: u64,
    pub rx: mpsc::Receiver<ToNode>,
    tx: mpsc::Sender<ToNode>,
    streams: Arc<Mutex<Streams>>,
}

impl Attached {
    /// Routes one message from the node to the stream that waits for it,
    /// without waiting: a stream whose queue is full is closed (its reader
    /// sees it end) and the node is told to stop it. True when the stream
    /// was closed so.
    pub fn deliver(&self, msg: FromNode) -> bool {
        let stream = msg.stream();
        let last = msg.is_last();
        let tx = {
            let Ok(mut s) = self.streams.lock() else {
                return false;
            };
            if last {
                s.remove(&stream)
            } else {
                s.get(&stream).cloned()
            }
        };
        let Some(tx) = tx else { return false };
        match tx.try_send(msg) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if let Ok(mut s) = self.streams.lock() {
                    s.remove(&stream);
                }
                let _ = self.tx.try_send(ToNode::Close { stream });
                !last
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // Every open stream ends: its receiver sees the channel close.
        if let Ok(mut s) = self.streams.lock() {
            s.clear();
        }
    }
}

/// One open stream to a node.
pub struct Stream {
    pub id: u64,
    pub rx: mpsc::Receiver<FromNode>,
    tx: mpsc::Sender<ToNode>,
}

impl Stream {
    /// Sends a follow-up message (input, end of input) on this stream.
    pub async fn send(&self, msg: ToNode) -> bool {
        self.tx.send(msg).await.is_ok()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Tell the node the requester is gone; best effort.
        let _ = self.tx.try_send(ToNode::Close { stream: self.id });
    }
}

impl NodeHub {
    /// Registers a node's new channel, replacing an older one.
    pub fn attach(&self, node: Uuid) -> Attached {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(NODE_QUEUE);
        let streams: Arc<Mutex<Streams>> = Arc::default();
        if let Ok(mut l) = self.links.lock() {
            l.insert(
                node,
                Link {
                    conn,
                    tx: tx.clone(),
                    streams: streams.clone(),
                },
            );
        }
        Attached {
            conn,
            rx,
            tx,
            streams,
        }
    }

    /// Forgets a channel that ended, unless a newer one replaced it.
    pub fn detach(&self, node: Uuid, conn: u64) {
        if let Ok(mut l) = self.links.lock()
            && l.get(&node).is_some_and(|k| k.conn == conn)
        {
            l.remove(&node);
        }
    }

    /// The nodes connected to this replica.
    pub fn connected(&self) -> Vec<Uuid> {
        self.links
            .lock()
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn is_connected(&self, node: Uuid) -> bool {
        self.links.lock().is_ok_and(|l| l.contains_key(&node))
    }

    /// Asks a node to heartbeat now; nothing happens if it is not connected.
    pub fn poke(&self, node: Uuid) {
        if let Ok(l) = self.links.lock()
            && let Some(k) = l.get(&node)
        {
            let _ = k.tx.try_send(ToNode::Poke);
        }
    }

    /// Opens a stream: `make` builds the request from the stream's number.
    /// `None` when the node has no channel to this replica.
    pub async fn open(&self, node: Uuid, make: impl FnOnce(u64) -> ToNode) -> Option<Stream> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (stx, srx) = mpsc::channel(STREAM_QUEUE);
        let tx = {
            let l = self.links.lock().ok()?;
            let k = l.get(&node)?;
            k.streams.lock().ok()?.insert(id, stx);
            k.tx.clone()
        };
        tx.send(make(id)).await.ok()?;
        Some(Stream { id, rx: srx, tx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(stream: u64) -> FromNode {
        FromNode::Console {
            stream,
            data: "eA==".into(),
        }
    }

    #[tokio::test]
    async fn a_stream_nobody_reads_is_closed_and_the_others_go_on() {
        let hub = NodeHub::default();
        let node = Uuid::new_v4();
        let mut att = hub.attach(node);
        let attach = |stream| ToNode::ConsoleAttach {
            stream,
            vm: byteport_types::VmId::new(),
        };
        let mut stuck = hub.open(node, attach).await.unwrap();
        let mut live = hub.open(node, attach).await.unwrap();
        // Far more than a queue's worth for the stream nobody reads, while
        // the other one is read as its answers come: none of this waits.
        let mut closed = 0;
        for _ in 0..(STREAM_QUEUE * 4) {
            closed += usize::from(att.deliver(console(stuck.id)));
            assert!(!att.deliver(console(live.id)));
            assert!(matches!(live.rx.try_recv(), Ok(FromNode::Console { .. })));
        }
        assert_eq!(closed, 1, "closed once, then forgotten");
        // The node is told to stop the stuck stream.
        let mut told = false;
        while let Ok(m) = att.rx.try_recv() {
            told |= matches!(m, ToNode::Close { stream } if stream == stuck.id);
        }
        assert!(told);
        // Its reader gets what was queued, then the end.
        let mut n = 0;
        while let Some(m) = stuck.rx.recv().await {
            assert!(matches!(m, FromNode::Console { .. }));
            n += 1;
        }
        assert_eq!(n, STREAM_QUEUE);
    }
}
