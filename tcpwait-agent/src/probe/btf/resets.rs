//! What the reset programs read, from the running kernel's BTF: the socket lock's owner flag,
//! `SO_LINGER` (`sk_flags` bits by their `enum sock_flags` names, `sk_lingertime`), the
//! `tcp_sock` sequence numbers whose differences are the queue lengths (`SIOCOUTQ`:
//! `write_seq - snd_una`; `SIOCINQ`: `rcv_nxt - copied_seq`), whether `tcp:tcp_send_reset`
//! passes an `enum sk_rst_reason` (6.10 and later), and that enum's names.
use tcpwait_common::reset::ResetOffsets;

use super::{Btf, BtfError, u32_at};

impl Btf {
    /// The offsets the reset programs read. `has_reason` says whether the `tcp_send_reset`
    /// tracepoint passes a reason (see [`Btf::send_reset_has_reason`]).
    pub fn reset_offsets(&self) -> Result<ResetOffsets, BtfError> {
        let sock = self.struct_id("sock")?;
        let tcp = self.struct_id("tcp_sock")?;
        let missing = |what: &str| BtfError::Missing(what.to_owned());
        let sized = |id: u32, name: &str, want: u32| -> Result<u32, BtfError> {
            match self.member(id, name) {
                Some((off, size)) if size == want && off != 0 => Ok(off),
                _ => Err(missing(&format!("{name} of {want} bytes"))),
            }
        };
        let (lock, lock_type) = self
            .member_typed(sock, "sk_lock")
            .ok_or_else(|| missing("sock.sk_lock"))?;
        let owned = match self.member(self.resolve(lock_type), "owned") {
            Some((off, 4)) => lock + off,
            _ => return Err(missing("socket_lock_t.owned")),
        };
        let bit = |name: &str| {
            self.enum_value("sock_flags", name)
                .ok_or_else(|| missing(&format!("enum sock_flags.{name}")))
        };
        Ok(ResetOffsets {
            lock_owned: owned,
            // `sk_flags` is a macro for `__sk_common.skc_flags`.
            sk_flags: {
                let common = self.struct_id("sock_common")?;
                let (at, _) = self
                    .member(sock, "__sk_common")
                    .ok_or_else(|| missing("sock.__sk_common"))?;
                at + sized(common, "skc_flags", 8)?
            },
            lingertime: sized(sock, "sk_lingertime", 8)?,
            write_seq: sized(tcp, "write_seq", 4)?,
            snd_una: sized(tcp, "snd_una", 4)?,
            rcv_nxt: sized(tcp, "rcv_nxt", 4)?,
            copied_seq: sized(tcp, "copied_seq", 4)?,
            linger_bit: bit("SOCK_LINGER")?,
            done_bit: bit("SOCK_DONE")?,
            has_reason: u32::from(self.send_reset_has_reason()),
        })
    }

    /// Whether `tcp:tcp_send_reset` passes `enum sk_rst_reason`: its BTF prototype
    /// (`btf_trace_tcp_send_reset`: context, sk, skb, reason) has four parameters. The same
    /// change (6.10) made `tcp_send_active_reset` fire it, so this also says whether the
    /// tracepoint sees aborts.
    pub fn send_reset_has_reason(&self) -> bool {
        let Some(id) = self
            .types
            .iter()
            .position(|t| t.kind == 8 && self.name(t.name_off) == "btf_trace_tcp_send_reset")
        else {
            return false;
        };
        // typedef → pointer → function prototype.
        let ptr = self.resolve(id as u32);
        let proto = self.types.get(ptr as usize).map(|t| t.size_or_type);
        proto
            .and_then(|p| self.types.get(p as usize))
            .is_some_and(|t| t.kind == 13 && t.count >= 4)
    }

    /// The value of enumerator `name` in `enum enum_name`.
    pub fn enum_value(&self, enum_name: &str, name: &str) -> Option<u32> {
        self.enumerators(enum_name)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// `enum enum_name`'s enumerators, `(name, value)`; empty if the kernel has no such enum.
    pub fn enumerators(&self, enum_name: &str) -> Vec<(String, u32)> {
        let Some(t) = self
            .types
            .iter()
            .find(|t| matches!(t.kind, 6 | 19) && self.name(t.name_off) == enum_name)
        else {
            return Vec::new();
        };
        let step = if t.kind == 6 { 8 } else { 12 };
        (0..t.count as usize)
            .filter_map(|i| {
                let at = t.members_at as usize + i * step;
                let name = self.name(u32_at(&self.type_data, at).ok()?).to_owned();
                Some((name, u32_at(&self.type_data, at + 4).ok()?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_running_kernels_reset_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("SKIPPED: this kernel exposes no /sys/kernel/btf/vmlinux");
            return;
        };
        let o = btf.reset_offsets().expect("offsets");
        // `enum sock_flags` has kept its first values since 2.6: SOCK_DEAD, SOCK_DONE,
        // SOCK_URGINLINE, SOCK_KEEPOPEN, SOCK_LINGER.
        assert_eq!((o.done_bit, o.linger_bit), (1, 4));
        // The sequence numbers lie in `struct tcp_sock`, past `struct sock`.
        let sock = btf.struct_id("sock").expect("struct sock");
        let sock_size = btf.types[sock as usize].size_or_type;
        for off in [o.write_seq, o.snd_una, o.rcv_nxt, o.copied_seq] {
            assert!(off >= sock_size, "{off} within struct sock ({sock_size})");
        }
        assert!(o.lock_owned < sock_size && o.sk_flags < sock_size);
        let reasons = btf.enumerators("sk_rst_reason");
        if btf.send_reset_has_reason() {
            assert_eq!(
                btf.enum_value("sk_rst_reason", "SK_RST_REASON_NOT_SPECIFIED"),
                Some(0)
            );
            assert!(reasons.len() > 10, "{reasons:?}");
        } else {
            eprintln!("this kernel's tcp_send_reset has no reason (before 6.10)");
        }
    }
}
