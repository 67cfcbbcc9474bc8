//! `tail` clients and their exact tally: every transition broadcast while a client is
//! connected is written to it, passed over by its filter, or counted as missed by it.
//!
//! The daemon numbers what it broadcasts (`TailHub::send`); a client knows its first number
//! and the next it expects, so a gap is exactly what it missed (the bounded channel dropped it
//! for a client that fell behind), told to the client as `{"missed": N}` and counted. A client
//! that stops reading altogether never takes another item: its misses are counted for it, live
//! (what the channel no longer holds for it), and when it goes (what it never took).
use std::sync::{
    Arc, Mutex, Weak,
    atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt as _,
    net::unix::OwnedWriteHalf,
    sync::broadcast::{self, error::RecvError, error::TryRecvError},
};

use super::{TailItem, TailLine};
use crate::{filter::Filter, output::TransitionRecord};

/// One broadcast item: its number and the transition.
type Numbered = (u64, Arc<TailItem>);

/// The daemon's end of the `tail` broadcast, numbering what it sends.
pub struct TailHub {
    sender: broadcast::Sender<Numbered>,
    tally: Arc<Tally>,
}

impl TailHub {
    /// A hub whose clients may lag `backlog` items behind before they skip ahead.
    pub fn new(backlog: usize) -> Self {
        let (sender, _) = broadcast::channel(backlog);
        Self {
            sender,
            tally: Arc::new(Tally {
                // What tokio's channel keeps: the capacity rounded up to a power of two.
                retained: backlog.next_power_of_two() as u64,
                ..Tally::default()
            }),
        }
    }

    /// Broadcasts one item to every connected client.
    pub fn send(&self, item: Arc<TailItem>) {
        // Numbered before it is sent: a client that subscribes after the send then reads a
        // count past it, and never expects it (see `TailHub::subscribe`).
        let seq = self.tally.sent.fetch_add(1, Ordering::AcqRel);
        // No receiver left is fine: nobody is tailing.
        let _ = self.sender.send((seq, item));
    }

    /// Clients connected now.
    pub fn receiver_count(&self) -> usize {
        self.sender.receiver_count()
    }

    /// The shared tally, for `status` and `/metrics`.
    pub fn tally(&self) -> Arc<Tally> {
        self.tally.clone()
    }

    /// A handle the API's accept loop subscribes clients with.
    pub fn subscriber(&self) -> Subscriber {
        Subscriber {
            sender: self.sender.clone(),
            tally: self.tally.clone(),
        }
    }
}

/// Subscribes new `tail` clients (held by the API's accept loop).
#[derive(Clone)]
pub struct Subscriber {
    sender: broadcast::Sender<Numbered>,
    tally: Arc<Tally>,
}

impl Subscriber {
    fn subscribe(&self) -> (broadcast::Receiver<Numbered>, Arc<Client>) {
        let rx = self.sender.subscribe();
        // Read after subscribing: every item numbered from here on reaches the receiver (an
        // item numbered earlier but sent after the subscription may arrive too: taken all
        // the same, and the client's first number moves down to it).
        let from = self.tally.sent.load(Ordering::Acquire);
        let client = Arc::new(Client {
            id: self.tally.next_id.fetch_add(1, Ordering::Relaxed),
            first: AtomicU64::new(from),
            next: AtomicU64::new(from),
            ..Client::default()
        });
        let mut live = self.tally.live.lock().expect("tally lock not poisoned");
        live.retain(|c| c.strong_count() > 0);
        live.push(Arc::downgrade(&client));
        (rx, client)
    }
}

/// Every client's tally: the ones gone, summed, and the live ones.
#[derive(Debug, Default)]
pub struct Tally {
    /// Items numbered so far: the next item's number.
    sent: AtomicU64,
    /// Items the channel keeps for a client that lags.
    retained: u64,
    next_id: AtomicU64,
    gone_written: AtomicU64,
    gone_filtered: AtomicU64,
    gone_missed: AtomicU64,
    live: Mutex<Vec<Weak<Client>>>,
}

impl Tally {
    /// Each live client's counts, as of now.
    pub fn clients(&self) -> Vec<TailClientReport> {
        let sent = self.sent.load(Ordering::Acquire);
        let live = self.live.lock().expect("tally lock not poisoned");
        live.iter()
            .filter_map(Weak::upgrade)
            .map(|c| c.report(sent, self.retained))
            .collect()
    }

    /// Items missed by every client, gone or live, as of now.
    pub fn missed(&self) -> u64 {
        self.gone_missed.load(Ordering::Relaxed)
            + self.clients().iter().map(|c| c.missed).sum::<u64>()
    }
}

/// One live client's counts in `status`:
/// `written + filtered + missed + buffered + queued == broadcast`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailClientReport {
    pub id: u64,
    /// Items broadcast while it has been connected.
    pub broadcast: u64,
    /// Written to it.
    pub written: u64,
    /// Passed over by its filter.
    pub filtered: u64,
    /// Missed: dropped by the channel before it took them.
    pub missed: u64,
    /// Taken from the channel, waiting to be written (the client's socket buffer is full).
    pub buffered: u64,
    /// Still in the channel for it.
    pub queued: u64,
}

/// One client's counts.
#[derive(Debug, Default)]
struct Client {
    id: u64,
    /// The first item number it was due.
    first: AtomicU64,
    /// The next item number it expects.
    next: AtomicU64,
    written: AtomicU64,
    filtered: AtomicU64,
    /// Gaps it has seen (and been told of).
    missed: AtomicU64,
    /// Records taken, not yet written.
    buffered: AtomicU64,
}

impl Client {
    /// Counts as of now, with `sent` numbered and `retained` kept by the channel: the items it
    /// has not taken and the channel no longer holds are missed already.
    fn report(&self, sent: u64, retained: u64) -> TailClientReport {
        let next = self.next.load(Ordering::Acquire);
        let gone = sent.saturating_sub(retained).saturating_sub(next);
        let first = self.first.load(Ordering::Relaxed);
        TailClientReport {
            id: self.id,
            broadcast: sent.saturating_sub(first),
            written: self.written.load(Ordering::Relaxed),
            filtered: self.filtered.load(Ordering::Relaxed),
            missed: self.missed.load(Ordering::Relaxed) + gone,
            buffered: self.buffered.load(Ordering::Relaxed),
            queued: sent.saturating_sub(next).min(retained),
        }
    }

    /// Takes item `seq`: returns the gap before it (items missed).
    fn take(&self, seq: u64) -> u64 {
        let next = self.next.load(Ordering::Relaxed);
        if seq < next {
            // Numbered before the subscription, sent after it.
            self.first.fetch_min(seq, Ordering::Relaxed);
            return 0;
        }
        let gap = seq - next;
        self.missed.fetch_add(gap, Ordering::Relaxed);
        self.next.store(seq + 1, Ordering::Release);
        gap
    }
}

/// Streams transitions to one `tail` client until the daemon stops or the client goes; the
/// client's counts join the tally's sums when it does.
pub(super) async fn stream(
    subscriber: &Subscriber,
    write: &mut OwnedWriteHalf,
    filter: &Filter,
) -> std::io::Result<()> {
    let (mut rx, client) = subscriber.subscribe();
    let mut out = Out {
        buf: Vec::with_capacity(64 * 1024),
        written: 0,
    };
    let result = async {
        line(&mut out.buf, &TailLine::Subscribed { subscribed: true })?;
        write.write_all(&out.buf).await?;
        out.buf.clear();
        loop {
            match rx.recv().await {
                Ok((seq, item)) => out.push(&client, seq, filter, &item)?,
                // The numbers tell what was skipped (see `Client::take`).
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return Ok(()),
            }
            // Batch what is already queued into one write.
            while out.buf.len() < 60 * 1024 {
                match rx.try_recv() {
                    Ok((seq, item)) => out.push(&client, seq, filter, &item)?,
                    Err(TryRecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
            client.buffered.store(out.written, Ordering::Relaxed);
            write.write_all(&out.buf).await?;
            out.buf.clear();
            client.written.fetch_add(out.written, Ordering::Relaxed);
            client.buffered.store(0, Ordering::Relaxed);
            out.written = 0;
        }
    }
    .await;
    // Gone: what it never took, and what was taken but not written, it missed.
    let end = subscriber.tally.sent.load(Ordering::Acquire);
    let next = client.next.load(Ordering::Relaxed);
    let missed = client.missed.load(Ordering::Relaxed) + end.saturating_sub(next) + out.written;
    let written = client.written.load(Ordering::Relaxed);
    let filtered = client.filtered.load(Ordering::Relaxed);
    // Out of the live list (its last strong reference) before it joins the sums, so that no
    // `status` counts it twice.
    drop(client);
    let t = &subscriber.tally;
    t.gone_written.fetch_add(written, Ordering::Relaxed);
    t.gone_filtered.fetch_add(filtered, Ordering::Relaxed);
    t.gone_missed.fetch_add(missed, Ordering::Relaxed);
    result
}

/// A client's pending output.
struct Out {
    buf: Vec<u8>,
    /// Records in `buf`, not yet written.
    written: u64,
}

impl Out {
    /// Takes item `seq` for `client`: tells it of a gap first, then the record if it passes
    /// the filter.
    fn push(
        &mut self,
        client: &Client,
        seq: u64,
        filter: &Filter,
        item: &TailItem,
    ) -> std::io::Result<()> {
        let gap = client.take(seq);
        if gap > 0 {
            line(&mut self.buf, &TailLine::Missed { missed: gap })?;
        }
        let (transition, time, ns_in_old, owner) = match item {
            TailItem::Transition {
                transition,
                time,
                ns_in_old,
                owner,
            } => (transition, *time, *ns_in_old, owner),
            TailItem::Reset { reset, record } => {
                let owner = record
                    .owner
                    .owner_pid
                    .zip(record.owner.owner_comm.as_deref());
                if !crate::resets::matches(filter, reset, owner) {
                    client.filtered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                crate::output::write_json_line(&mut self.buf, &**record)
                    .map_err(std::io::Error::other)?;
                self.written += 1;
                return Ok(());
            }
        };
        if !filter.matches(transition, owner.as_ref().map(|o| (o.pid, o.comm.as_str()))) {
            client.filtered.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let record = TransitionRecord::new(transition, ns_in_old, owner.as_ref(), time);
        crate::output::write_json_line(&mut self.buf, &record).map_err(std::io::Error::other)?;
        self.written += 1;
        Ok(())
    }
}

fn line(buf: &mut Vec<u8>, l: &TailLine<'_>) -> std::io::Result<()> {
    serde_json::to_writer(&mut *buf, l).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_missed_and_early_items_move_the_start() {
        let c = Client {
            first: AtomicU64::new(10),
            next: AtomicU64::new(10),
            ..Client::default()
        };
        // Numbered before the subscription, sent after it.
        assert_eq!(c.take(9), 0);
        assert_eq!(c.take(10), 0);
        assert_eq!(c.take(14), 3);
        let r = c.report(15, 1024);
        assert_eq!((r.broadcast, r.missed, r.queued), (6, 3, 0));
    }

    #[test]
    fn a_client_that_stops_taking_misses_what_the_channel_dropped() {
        let c = Client::default();
        assert_eq!(c.take(0), 0);
        // 101 numbered (0..=100), the channel keeps the last 64 (37..=100): 1..=36 are gone.
        let r = c.report(101, 64);
        assert_eq!((r.broadcast, r.missed, r.queued), (101, 36, 64));
    }
}
