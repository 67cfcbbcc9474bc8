//! Field offsets of `struct sock` from the running kernel's BTF (`/sys/kernel/btf/vmlinux`),
//! for the BTF- and raw-tracepoint programs, which receive a `struct sock *` instead of the
//! classic tracepoint's record, and of the socket's network namespace inode (`struct net`),
//! which every program reads. Offsets are read at load time, never hard-coded for one kernel,
//! and passed to the programs as read-only globals.
//!
//! The parser reads only what it needs from the BTF format (include/uapi/linux/btf.h): type
//! records, struct/union members, names; it follows anonymous struct/union members, because
//! `skc_dport`/`skc_num` and the addresses sit inside anonymous unions of `struct sock_common`.
//! aya's own parse (`aya::Btf`, aya-obj 0.3) cannot answer these questions: its public API finds
//! a type's id by name, but its types' members, offsets and enumerators are crate-private.
use tcpwait_common::SockOffsets;

mod resets;

const BTF_MAGIC: u16 = 0xeb9f;

/// Why offsets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] std::io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no {0}")]
    Missing(String),
}

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// For struct/union: where its members start in `Btf::type_data`, and how many.
    members_at: u32,
    vlen: u32,
    /// The record's own count (members, enumerators, parameters), whatever its kind.
    count: u32,
    /// Size for struct/union/int; referenced type id for typedef/const/volatile/...
    size_or_type: u32,
}

/// A parsed BTF blob.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    /// The type section. Members are read from it on demand: no allocation per type, so the
    /// parse leaves nothing behind in the agent's heap once dropped.
    type_data: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Malformed("truncated"))
}

/// Reads the running kernel's BTF, `/sys/kernel/btf/vmlinux`. `TCPWAIT_KERNEL_BTF` names
/// another file: the test of the no-BTF fallback points it at none, as on a kernel built
/// without BTF. Read once at start, for this parser and aya's alike (`Probe::attach`).
pub fn read_kernel() -> Result<Vec<u8>, BtfError> {
    let path = std::env::var("TCPWAIT_KERNEL_BTF")
        .unwrap_or_else(|_| "/sys/kernel/btf/vmlinux".to_owned());
    std::fs::read(&path).map_err(|e| BtfError::Read(path, e))
}

impl Btf {
    /// Parses a little-endian BTF blob.
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_bytes = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        // Type id 0 is `void`.
        let mut types = Vec::with_capacity(types_bytes.len() / 16);
        types.push(Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            members_at: 0,
            vlen: 0,
            count: 0,
            size_or_type: 0,
        });
        let mut p = 0;
        while p < types_bytes.len() {
            let name_off = u32_at(types_bytes, p)?;
            let info = u32_at(types_bytes, p + 4)?;
            let size_or_type = u32_at(types_bytes, p + 8)?;
            p += 12;
            let (vlen, kind, kind_flag) = (
                (info & 0xffff) as usize,
                (info >> 24) & 0x1f,
                info >> 31 == 1,
            );
            let members_at = p as u32;
            p += match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => vlen * 12, // STRUCT, UNION (members), DATASEC, ENUM64
                6 | 13 => vlen * 8,           // ENUM, FUNC_PROTO
                _ => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            };
            if p > types_bytes.len() {
                return Err(BtfError::Malformed("type record out of bounds"));
            }
            let count = vlen as u32;
            let vlen = if matches!(kind, 4 | 5) {
                vlen as u32
            } else {
                0
            };
            types.push(Type {
                name_off,
                kind,
                kind_flag,
                members_at,
                vlen,
                count,
                size_or_type,
            });
        }
        Ok(Self {
            types,
            strings,
            type_data: types_bytes.to_vec(),
        })
    }

    /// Reads and parses the running kernel's BTF (see [`read_kernel`]).
    #[cfg(test)]
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::parse(&read_kernel()?)
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.types
            .iter()
            .position(|t| t.kind == 4 && t.vlen > 0 && self.name(t.name_off) == name)
            .map(|i| i as u32)
            .ok_or_else(|| BtfError::Missing(format!("struct {name}")))
    }

    /// Follows typedef/volatile/const/restrict/type_tag to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(8 | 9 | 10 | 11 | 18) => id = self.types[id as usize].size_or_type,
                _ => break,
            }
        }
        id
    }

    /// Byte offset and size of `member` in struct/union `id`, searching anonymous members.
    fn member(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let (off, ty) = self.member_typed(id, member)?;
        Some((off, self.size(ty)?))
    }

    /// Whether type `id` is a pointer (after typedefs and qualifiers).
    fn is_pointer(&self, id: u32) -> bool {
        self.types.get(self.resolve(id) as usize).map(|t| t.kind) == Some(2)
    }

    /// Byte offset and type id of `member` in struct/union `id`, searching anonymous members.
    fn member_typed(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let t = self.types.get(id as usize)?;
        for i in 0..t.vlen as usize {
            let m = t.members_at as usize + i * 12;
            let (name_off, ty, off) = (
                u32_at(&self.type_data, m).ok()?,
                u32_at(&self.type_data, m + 4).ok()?,
                u32_at(&self.type_data, m + 8).ok()?,
            );
            // With kind_flag, the offset's low 24 bits are the bit offset (bitfields).
            let bits = if t.kind_flag { off & 0xff_ffff } else { off };
            let name = self.name(name_off);
            if name == member {
                if bits % 8 != 0 || (t.kind_flag && off >> 24 != 0) {
                    return None; // a bitfield: not readable as a whole field
                }
                return Some((bits / 8, ty));
            }
            if name.is_empty() {
                let inner = self.resolve(ty);
                if let Some((o, ty)) = self.member_typed(inner, member) {
                    return Some((bits / 8 + o, ty));
                }
            }
        }
        None
    }

    fn size(&self, id: u32) -> Option<u32> {
        let t = self.types.get(self.resolve(id) as usize)?;
        match t.kind {
            1 | 4 | 5 | 6 | 16 | 19 => Some(t.size_or_type),
            2 => Some(8),
            _ => None,
        }
    }

    /// The offsets the raw-tracepoint program reads.
    pub fn sock_offsets(&self) -> Result<SockOffsets, BtfError> {
        let common = self.struct_id("sock_common")?;
        let sock = self.struct_id("sock")?;
        let (common_in_sock, _) = self
            .member(sock, "__sk_common")
            .ok_or_else(|| BtfError::Missing("sock.__sk_common".into()))?;
        let field = |name: &str, want: &[u32]| -> Result<u32, BtfError> {
            let (off, size) = self
                .member(common, name)
                .ok_or_else(|| BtfError::Missing(format!("sock_common.{name}")))?;
            if !want.contains(&size) {
                return Err(BtfError::Missing(format!(
                    "sock_common.{name} of size {size}"
                )));
            }
            Ok(common_in_sock + off)
        };
        let (protocol, protocol_size) = self.member(sock, "sk_protocol").ok_or_else(|| {
            BtfError::Missing("sock.sk_protocol (as a whole field: kernel ≥ 5.6)".into())
        })?;
        Ok(SockOffsets {
            family: field("skc_family", &[2])?,
            sport: {
                let inet = self.struct_id("inet_sock")?;
                match self.member(inet, "inet_sport") {
                    Some((off, 2)) => off,
                    _ => return Err(BtfError::Missing("inet_sock.inet_sport".into())),
                }
            },
            dport: field("skc_dport", &[2])?,
            rcv_saddr: field("skc_rcv_saddr", &[4])?,
            daddr: field("skc_daddr", &[4])?,
            v6_rcv_saddr: field("skc_v6_rcv_saddr", &[16])?,
            v6_daddr: field("skc_v6_daddr", &[16])?,
            protocol,
            protocol_size,
            // Filled from `netns_offsets`, which may fail alone.
            net: 0,
            net_inum: 0,
            always: 0,
            txhash: match self.member(sock, "sk_txhash") {
                Some((off, 4)) => off,
                _ => return Err(BtfError::Missing("sock.sk_txhash of 4 bytes".into())),
            },
            // The helper's tracing variant (Linux 5.12), which a BTF tracepoint may call.
            cookie: u32::from(self.has_func("bpf_get_socket_ptr_cookie")),
        })
    }

    /// Whether the kernel has a function of this name (a `FUNC` record, kind 12).
    fn has_func(&self, name: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.kind == 12 && self.name(t.name_off) == name)
    }

    /// Where the socket's network namespace inode number is: `(net, net_inum)`, the offset of
    /// the `struct net *` in `struct sock` (`__sk_common.skc_net.net`) and the offset of
    /// `ns.inum` in `struct net`. Found by name: `skc_net` is a `possible_net_t`, a typedef of
    /// an anonymous struct holding `net` (an empty one without CONFIG_NET_NS); `struct
    /// ns_common` changed shape over time (on 6.18 `inum` follows the new `ns_type` and
    /// precedes an anonymous union), so `inum` is searched through anonymous members too.
    /// Read from Debian's kernel packages' BTF (2026-12-05), as `bpftool btf dump` shows
    /// them: 5.10.0-46 and 6.1.0-57 `(48, 144)`, 6.12.118 `(48, 136)`, 6.18 `(48, 176)`.
    pub fn netns_offsets(&self) -> Result<(u32, u32), BtfError> {
        let sock = self.struct_id("sock")?;
        let (common_in_sock, _) = self
            .member(sock, "__sk_common")
            .ok_or_else(|| BtfError::Missing("sock.__sk_common".into()))?;
        let common = self.struct_id("sock_common")?;
        let (skc_net, skc_net_type) = self
            .member_typed(common, "skc_net")
            .ok_or_else(|| BtfError::Missing("sock_common.skc_net".into()))?;
        let net = match self.member_typed(self.resolve(skc_net_type), "net") {
            Some((off, ty)) if self.is_pointer(ty) => common_in_sock + skc_net + off,
            _ => {
                return Err(BtfError::Missing(
                    "possible_net_t.net (a kernel without CONFIG_NET_NS)".into(),
                ));
            }
        };
        let net_struct = self.struct_id("net")?;
        let (ns, ns_type) = self
            .member_typed(net_struct, "ns")
            .ok_or_else(|| BtfError::Missing("net.ns".into()))?;
        let inum = match self.member(self.resolve(ns_type), "inum") {
            Some((off, 4)) => ns + off,
            _ => return Err(BtfError::Missing("ns_common.inum of 4 bytes".into())),
        };
        Ok((net, inum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_running_kernels_sock_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!(
                "SKIPPED: this kernel exposes no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)"
            );
            return;
        };
        let o = btf.sock_offsets().expect("offsets");
        // struct sock_common starts struct sock; its first fields are fixed by the ABI of
        // inet_hashtables (addrpair, hash, portpair): daddr 0, rcv_saddr 4, dport 12.
        assert_eq!((o.daddr, o.rcv_saddr, o.dport, o.family), (0, 4, 12, 16));
        assert!(
            o.sport > o.v6_rcv_saddr,
            "inet_sport lies in inet_sock, after sock: {o:?}"
        );
        assert_eq!(o.protocol_size, 2);
        assert!(
            o.v6_daddr > o.family && o.v6_rcv_saddr == o.v6_daddr + 16,
            "{o:?}"
        );
        // sk_txhash lies in struct sock, after sock_common and before inet_sock's fields.
        assert!(
            o.txhash > o.v6_rcv_saddr && o.txhash < o.sport && o.txhash % 4 == 0,
            "{o:?}"
        );
        // Every kernel since 5.12 lets tracing programs ask for a socket's cookie.
        let (major, minor) = crate::probe::account::kernel_version();
        assert_eq!(o.cookie, u32::from((major, minor) >= (5, 12)), "{o:?}");
    }

    #[test]
    fn reads_the_running_kernels_netns_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!(
                "SKIPPED: this kernel exposes no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)"
            );
            return;
        };
        let o = btf.sock_offsets().expect("offsets");
        let (net, inum) = btf.netns_offsets().expect("netns offsets");
        // skc_net lies in struct sock_common, after the addresses and ports and before the
        // IPv6 addresses (include/net/sock.h), and holds an aligned pointer; the privileged
        // trace tests check the value read there against /proc/<pid>/ns/net.
        assert!(
            net > o.dport && net < o.v6_daddr && net % 8 == 0,
            "{net} {o:?}"
        );
        // struct net starts with other fields (refcount, locks, lists) before ns.
        assert!(inum > 0 && inum % 4 == 0, "{inum}");
        if std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .is_ok_and(|r| r.starts_with("6.18."))
        {
            // As `bpftool btf dump file /sys/kernel/btf/vmlinux` shows on the project's 6.18
            // machines: skc_net at bit 384 of sock_common; ns at bit 1216 of net, inum at bit
            // 192 of ns_common.
            assert_eq!((net, inum), (48, 152 + 24));
        }
    }

    /// A hand-made BTF blob (include/uapi/linux/btf.h): a header, then type records, then
    /// strings.
    struct Blob {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Blob {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn record(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32) -> u32 {
            let name = self.str(name);
            for w in [name, (kind << 24) | vlen, size_or_type] {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.record(name, 1, 0, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
            id
        }

        /// A struct of `(name, type, byte offset)` members.
        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            let id = self.record(name, 4, members.len() as u32, size);
            for &(m, ty, off) in members {
                let m = self.str(m);
                for w in [m, ty, off * 8] {
                    self.types.extend_from_slice(&w.to_le_bytes());
                }
            }
            id
        }

        fn bytes(&self) -> Vec<u8> {
            let mut b = Vec::new();
            b.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
            let (tl, sl) = (self.types.len() as u32, self.strings.len() as u32);
            for w in [24, 0, tl, tl, sl] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            b.extend_from_slice(&self.types);
            b.extend_from_slice(&self.strings);
            b
        }
    }

    /// A kernel whose `possible_net_t` holds `net` when `net_ns`, with `inum` inside an
    /// anonymous struct of `ns_common`.
    fn mini_kernel(net_ns: bool) -> Btf {
        let mut b = Blob::new();
        let uint = b.int("unsigned int", 4);
        // Ids are given in order: net = uint + 1, its pointer + 2, ns_common + 4.
        let (net, ptr, ns_common) = (uint + 1, uint + 2, uint + 4);
        b.strukt("net", 64, &[("passive", uint, 0), ("ns", ns_common, 16)]);
        b.record("", 2, 0, net); // PTR to struct net
        let anon_inner = b.strukt("", 16, &[("stashed", uint, 0), ("inum", uint, 8)]);
        assert_eq!(anon_inner, uint + 3);
        assert_eq!(b.strukt("ns_common", 16, &[("", anon_inner, 0)]), ns_common);
        let wrapper = if net_ns {
            b.strukt("", 8, &[("net", ptr, 0)])
        } else {
            b.strukt("", 0, &[])
        };
        let possible = b.record("possible_net_t", 8, 0, wrapper); // TYPEDEF
        let common = b.strukt(
            "sock_common",
            24,
            &[("skc_daddr", uint, 0), ("skc_net", possible, 16)],
        );
        b.strukt("sock", 32, &[("__sk_common", common, 0)]);
        Btf::parse(&b.bytes()).expect("hand-made BTF parses")
    }

    #[test]
    fn netns_offsets_follow_typedefs_and_anonymous_members() {
        // skc_net at 16 in sock_common (at 0 in sock), net at 0 in possible_net_t; ns at 16 in
        // struct net, inum at 8 in the anonymous struct at 0 of ns_common.
        assert_eq!(
            mini_kernel(true).netns_offsets().expect("offsets"),
            (16, 24)
        );
        let err = mini_kernel(false)
            .netns_offsets()
            .expect_err("no CONFIG_NET_NS");
        assert!(err.to_string().contains("CONFIG_NET_NS"), "{err}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"not btf at all, not at all.").is_err());
        assert!(
            Btf::parse(&[
                0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ])
            .is_err()
        );
    }
}
