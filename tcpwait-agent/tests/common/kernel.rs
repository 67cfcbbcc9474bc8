//! What the running kernel can do, for tests that run on every kernel of the matrix (the
//! host's and the ones `cargo xtask vm-test` boots): version checks for behaviour that changed.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

/// The running kernel's (major, minor), from `uname -r`.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().expect("a number"));
    (parts.next().expect("major"), parts.next().expect("minor"))
}

/// Whether the kernel counts a BPF program's recursion misses (`recursion_misses` in its
/// fdinfo, Linux ≥ 5.12).
pub fn kernel_counts_recursion() -> bool {
    kernel_version() >= (5, 12)
}

/// The summary's loss part when nothing was lost: where the kernel keeps no recursion-miss
/// count, that count is unknown and the total only a lower bound.
pub fn no_loss_summary() -> &'static str {
    no_loss_summary_counted(kernel_counts_recursion())
}

/// [`no_loss_summary`] for a main program whose recursion misses the kernel counts, or not
/// (the classic tracepoint's are counted from Linux 6.7).
pub fn no_loss_summary_counted(counted: bool) -> &'static str {
    if counted {
        " 0 lost (ring buffer full: 0, kernel recursion misses: 0, malformed: 0)"
    } else {
        " at least 0 lost (ring buffer full: 0, kernel recursion misses: unknown, malformed: 0)"
    }
}

/// What `trace` names on its start-up line for the programs every kernel of the matrix should
/// get: the BTF tracepoint, batched, with the rescue program (DESIGN.md, "Kernel matrix").
pub fn expected_programs() -> &'static str {
    "(sock:inet_sock_set_state, BTF tracepoint; aborts from "
}

/// Whether the kernel fills in the peer's address and port before the LISTEN → SYN_RECV
/// transition of an accepted socket: from Linux 6.15 (commit a3a128f611a9); before, that
/// transition carries the listener's tuple with the peer unset.
pub fn kernel_sets_peer_before_syn_recv() -> bool {
    kernel_version() >= (6, 15)
}
