//! Field offsets of `struct sock` from the running kernel's BTF (`/sys/kernel/btf/vmlinux`),
//! for the raw-tracepoint program, which receives a `struct sock *` instead of the classic
//! tracepoint's record. Offsets are read at load time, never hard-coded for one kernel, and
//! passed to the program as read-only globals.
//!
//! The parser reads only what it needs from the BTF format (include/uapi/linux/btf.h): type
//! records, struct/union members, names; it follows anonymous struct/union members, because
//! `skc_dport`/`skc_num` and the addresses sit inside anonymous unions of `struct sock_common`.
use tcpwait_common::SockOffsets;

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
                size_or_type,
            });
        }
        Ok(Self {
            types,
            strings,
            type_data: types_bytes.to_vec(),
        })
    }

    /// Reads the running kernel's BTF. `TCPWAIT_KERNEL_BTF` names another file: the test of
    /// the no-BTF fallback points it at none, as on a kernel built without BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = std::env::var("TCPWAIT_KERNEL_BTF")
            .unwrap_or_else(|_| "/sys/kernel/btf/vmlinux".to_owned());
        let bytes = std::fs::read(&path).map_err(|e| BtfError::Read(path.clone(), e))?;
        Self::parse(&bytes)
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
                return Some((bits / 8, self.size(ty)?));
            }
            if name.is_empty() {
                let inner = self.resolve(ty);
                if let Some((o, s)) = self.member(inner, member) {
                    return Some((bits / 8 + o, s));
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
            always: 0,
        })
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
