//! Which programs run, in which order they are attached and detached.
//!
//! Order matters to the loss accounting (`probe::account`): the tracepoint calls its programs
//! in the order they were attached, so the main program is attached first and the rescue
//! program after it (the rescue program must run after the main one for every hit: it then
//! finds the main program's mark cleared unless the hit nested into it); at the stop the
//! rescue program goes first.
use std::{
    any::Any,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, TracePoint},
};
use tracing::{debug, warn};

use super::{Attachment, ProbeError, attach::attach_classic};

/// The main BTF program.
const MAIN: &str = "inet_sock_set_state_btf";
/// The rescue program.
const RESCUE: &str = "inet_sock_set_state_nested";

/// The attached programs.
pub(super) struct Programs {
    /// The main program's fd (the BTF one where both run, in the test mode that compares).
    pub main_fd: i32,
    pub attachment: Attachment,
    /// Owned links in attach order; dropping one detaches it.
    links: Vec<Box<dyn Any>>,
}

impl Programs {
    /// Loads and attaches the main program (BTF where `btf` is given and `default`, else the
    /// classic tracepoint, or both for `compare`) and, after the BTF one, the rescue program.
    pub(super) fn attach(
        ebpf: &mut Ebpf,
        (category, name): (&str, &str),
        btf: Result<&Btf, String>,
        compare: bool,
        check_classic: impl FnOnce() -> Result<(), ProbeError>,
    ) -> Result<Self, ProbeError> {
        let mut links: Vec<Box<dyn Any>> = Vec::new();
        let mut attachment = Attachment {
            btf: false,
            rescue: false,
            batched: false,
        };
        let mut main_fd = None;
        let mut rescue = false;
        if let Ok(btf) = &btf {
            match load_btf(ebpf, MAIN, name, btf).and_then(|()| attach_btf(ebpf, MAIN)) {
                Ok((fd, link)) => {
                    links.push(link);
                    main_fd = Some(fd);
                    attachment.btf = true;
                    match load_btf(ebpf, RESCUE, name, btf) {
                        Ok(()) => rescue = true,
                        Err(e) => {
                            warn!(
                                error = first_line(&e),
                                "cannot load the rescue program: transitions the kernel skips \
                                 as nested are counted as lost"
                            );
                            debug!(error = %e, "the rescue program's refusal in full");
                        }
                    }
                }
                Err(e) => warn!(
                    error = first_line(&e),
                    "BTF tracepoint unavailable, using the classic tracepoint"
                ),
            }
        } else if let (Err(e), true) = (&btf, (category, name) == super::TRACEPOINT) {
            warn!(
                error = %e,
                "no kernel BTF: transitions the kernel skips as nested are counted as lost \
                 where the kernel counts them (Linux 6.7; the classic tracepoint has no rescue \
                 program)"
            );
        }
        if main_fd.is_none() || compare {
            check_classic()?;
            let (fd, link) = attach_classic(ebpf, category, name)?;
            links.push(link);
            main_fd.get_or_insert(fd);
        }
        if rescue {
            match attach_btf(ebpf, RESCUE) {
                Ok((_, link)) => {
                    links.push(link);
                    attachment.rescue = true;
                }
                Err(e) => warn!(
                    error = first_line(&e),
                    "cannot attach the rescue program: transitions the kernel skips as nested \
                     are counted as lost"
                ),
            }
        }
        Ok(Self {
            main_fd: main_fd.expect("the main program is attached or an error returned"),
            attachment,
            links,
        })
    }

    /// Detaches the programs, the last attached first (the rescue program before the main
    /// one). Runs already in flight may still finish: see `account::wait_for_runs_in_flight`.
    pub(super) fn detach(&mut self) {
        while let Some(link) = self.links.pop() {
            drop(link);
        }
    }
}

/// The first line of an error: a verifier refusal carries the whole log after it.
fn first_line(e: &anyhow::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// Loads one of the BTF tracepoint programs for tracepoint `name`.
fn load_btf(ebpf: &mut Ebpf, prog: &str, name: &str, btf: &Btf) -> anyhow::Result<()> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .expect("the object defines the BTF programs")
        .try_into()
        .expect("a BTF tracepoint program");
    program.load(name, btf)?;
    Ok(())
}

/// Attaches a loaded BTF tracepoint program; returns its fd and its owned link.
fn attach_btf(ebpf: &mut Ebpf, prog: &str) -> anyhow::Result<(i32, Box<dyn Any>)> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .expect("the object defines the BTF programs")
        .try_into()
        .expect("a BTF tracepoint program");
    let id = program.attach()?;
    let link = program.take_link(id)?;
    Ok((program.fd()?.as_fd().as_raw_fd(), Box::new(link)))
}

/// For the classic tracepoint's loader (`attach::attach_classic`).
pub(super) fn take_classic(
    program: &mut TracePoint,
    id: aya::programs::trace_point::TracePointLinkId,
) -> anyhow::Result<Box<dyn Any>> {
    Ok(Box::new(program.take_link(id)?))
}
