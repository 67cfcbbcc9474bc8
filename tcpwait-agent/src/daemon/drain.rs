//! The event path: what the ring buffer holds, decoded, into the tracker (and the abort
//! tallies, the TIME_WAIT closers, the edge counts), then to `tail` clients and the
//! transition log.
use std::sync::Arc;

use super::Daemon;
use crate::{
    api::TailItem,
    event::{Record, decode_record},
    model::Tuple,
    output::{OwnerView, TransitionRecord},
};

impl Daemon {
    /// Takes in every transition up to now: the CPUs' stages flushed whatever the time since
    /// the last flush, then drained. Before what must see all of them (a snapshot, a census,
    /// an API answer).
    pub(super) fn take_in_all(&mut self) {
        self.probe.flush_now();
        self.drain();
    }

    pub(super) fn drain(&mut self) {
        let withhold = self.args.test_withhold_events;
        let publish = self.tail.receiver_count() > 0;
        let record = publish || self.sinks.translog.is_some();
        let mut items = Vec::new();
        self.clock.refresh(self.now_ns());
        let clock = self.clock;
        let Self {
            probe,
            tracker,
            malformed,
            transitions,
            left_during_snapshot,
            in_flight,
            edges,
            settling,
            aborts,
            timewait,
            ..
        } = self;
        probe.drain(|bytes| match decode_record(bytes) {
            Ok(Record::Reset(reset)) => {
                let record = Box::new(aborts.on_reset(&reset, tracker, clock.wall(reset.ts_ns)));
                if publish && !withhold {
                    items.push(Arc::new(TailItem::Reset { reset, record }));
                }
            }
            Ok(Record::Transition(t)) => {
                *transitions += 1;
                edges.count(t.old, t.new);
                if withhold {
                    return;
                }
                let entered = if record {
                    tracker.socket(t.sock, t.ts_ns)
                } else {
                    None
                };
                // Looked up before `apply`: a transition to CLOSE removes the socket.
                let owner_before = if record {
                    tracker.first_owner(t.sock)
                } else {
                    None
                };
                // While a snapshot is in flight: a socket that leaves a watched state, or
                // closes (reconciliation adds what it shows in any state: a socket closed
                // after the dump started would come back as a phantom; seen in CI, an
                // ESTABLISHED entry beside the TIME_WAIT socket it had become). Moves
                // between other states are newer than the dump by their entry time.
                if *in_flight && (tracker.watches(t.old) || t.new == crate::event::TcpState::Close)
                {
                    let tuple = Tuple {
                        saddr: t.saddr,
                        sport: t.sport,
                        daddr: t.daddr,
                        dport: t.dport,
                    };
                    left_during_snapshot.insert((t.netns, tuple), t.ts_ns);
                }
                timewait.note_close(&t);
                let applied = tracker.apply(&t);
                if applied.needs_owners {
                    settling.push(t.sock, t.ts_ns);
                }
                if record {
                    let ns_in_old = entered
                        .filter(|e| !e.age_is_lower_bound && e.state == t.old)
                        .map(|e| t.ts_ns.saturating_sub(e.entered_ns));
                    let owner = owner_before
                        .or_else(|| tracker.first_owner(t.sock))
                        .and_then(|k| {
                            tracker.process_info(&k).map(|p| OwnerView {
                                pid: p.key.pid,
                                comm: p.comm.clone(),
                                container: p.container.clone(),
                                pod_uid: p.pod_uid.clone(),
                            })
                        });
                    items.push(Arc::new(TailItem::Transition {
                        time: clock.wall(t.ts_ns),
                        transition: t,
                        ns_in_old,
                        owner,
                    }));
                }
            }
            Err(e) => malformed.count(e),
        });
        if let Some(log) = &self.sinks.translog
            && !items.is_empty()
        {
            let mut lines = Vec::with_capacity(items.len() * 320);
            let mut n = 0;
            for item in &items {
                let written = match &**item {
                    TailItem::Transition {
                        transition,
                        time,
                        ns_in_old,
                        owner,
                    } => crate::output::write_json_line(
                        &mut lines,
                        &TransitionRecord::new(transition, *ns_in_old, owner.as_ref(), *time),
                    ),
                    // The transition log holds transitions only: its lines, failed and dropped
                    // lines add up to the transitions, exactly.
                    TailItem::Reset { .. } => continue,
                };
                if written.is_ok() {
                    n += 1;
                }
            }
            log.send(lines, n);
        }
        if publish {
            self.pending_tail.extend(items);
        }
    }

    /// Hands drained transitions to `tail` clients in chunks, yielding between chunks so the
    /// client tasks (on this same thread) keep up with a burst instead of lagging behind it.
    pub(super) async fn publish(&mut self) {
        const CHUNK: usize = 256;
        let mut items = std::mem::take(&mut self.pending_tail);
        for chunk in items.chunks(CHUNK) {
            for item in chunk {
                self.tail.send(item.clone());
            }
            if items.len() > CHUNK {
                tokio::task::yield_now().await;
            }
        }
        items.clear();
        if self.pending_tail.is_empty() {
            self.pending_tail = items; // keep the allocation
        }
    }
}
