//! Who holds a socket. inet_diag (`diag`) gives each socket's 4-tuple, inode, queues and
//! `tcp_info`; procfs (`procs`) maps inodes to the processes whose fd tables refer to them.
//! Neither runs per event: the daemon's resolver thread calls them in batches, when sockets
//! enter CLOSE_WAIT without a known owner and for periodic reconciliation.
pub mod diag;
pub mod procs;
