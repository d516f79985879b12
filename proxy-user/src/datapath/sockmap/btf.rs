//! Just enough of a BTF reader to find where a member sits in a kernel struct. The verdict program
//! reads two kernel fields that no BPF context exposes (an skb's TCP sequence number and its socket's
//! `copied_seq`), and their offsets differ between kernel builds; the kernel describes its own types
//! in `/sys/kernel/btf/vmlinux` (format: Documentation/bpf/btf.rst).

use std::borrow::Cow;
use std::io::{self, Read as _};
use std::ptr::NonNull;

/// Where the kernel publishes its type information.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
/// Largest kernel BTF read (distribution kernels have 5–10 MiB).
pub const MAX_VMLINUX: usize = 64 << 20;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// `struct btf_type`: name, info, size or type.
const TYPE_LEN: usize = 12;
/// `struct btf_member` (name, type, offset), and the entries of `DATASEC` and `ENUM64`, are 12 bytes.
const MEMBER_LEN: usize = 12;
/// Anonymous structs and unions looked through, nested (the kernel nests two or three deep).
const MAX_NESTING: u32 = 8;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// A file's bytes in pages mapped for it alone. The kernel's BTF is several MiB: read into the heap,
/// glibc's adaptive mmap threshold would rise to that size and later allocations would stay resident
/// (the agent idled at 22 MiB instead of 9).
pub struct Slurped {
    ptr: NonNull<u8>,
    /// Bytes mapped.
    size: usize,
    /// Bytes read.
    len: usize,
}

#[expect(unsafe_code, reason = "an anonymous mapping has no safe wrapper")]
impl Slurped {
    /// Reads all of `path` (at most `max` bytes).
    pub fn read(path: &str, max: usize) -> io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let size = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
        if size == 0 || size > max {
            return Err(io::Error::other(format!("{path}: {size} bytes (expected 1 to {max})")));
        }
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast()).ok_or_else(io::Error::last_os_error)?;
        let mut this = Self { ptr, size, len: 0 };
        // SAFETY: the mapping is `size` bytes, readable and writable, and owned by `this`.
        let buf = unsafe { std::slice::from_raw_parts_mut(this.ptr.as_ptr(), size) };
        while this.len < size {
            match file.read(&mut buf[this.len..])? {
                0 => break,
                n => this.len += n,
            }
        }
        Ok(this)
    }

    /// The bytes read.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the mapping were written by `read`, and it lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

#[expect(unsafe_code, reason = "an anonymous mapping has no safe wrapper")]
impl Drop for Slurped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `read` created; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}

/// A parsed BTF blob: where each type starts, and the string section.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Byte offset in `types` of type id `i + 1`.
    starts: Vec<usize>,
}

/// Why a BTF blob could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// Not BTF, or cut short.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A type kind this reader does not know how to skip.
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn usize_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u32_at(b, at)?).ok()
}

impl<'a> Btf<'a> {
    /// Indexes a BTF blob in the host's byte order (as the kernel writes its own).
    pub fn parse(blob: &'a [u8]) -> Result<Self, BtfError> {
        if blob.get(..2).map(|m| u16::from_ne_bytes([m[0], m[1]])) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic"));
        }
        let field = |at| usize_at(blob, at).ok_or(BtfError::Malformed("truncated header"));
        let hdr_len = field(4)?;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Malformed("header too short"));
        }
        let (type_off, type_len, str_off, str_len) = (field(8)?, field(12)?, field(16)?, field(20)?);
        let section = |off: usize, len: usize| blob.get(hdr_len + off..hdr_len + off + len);
        let types = section(type_off, type_len).ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = section(str_off, str_len).ok_or(BtfError::Malformed("string section out of bounds"))?;
        let mut starts = Vec::new();
        let mut at = 0;
        while at < types.len() {
            starts.push(at);
            let info = u32_at(types, at + 4).ok_or(BtfError::Malformed("truncated type"))?;
            let vlen = usize::try_from(info & 0xffff).expect("16 bits fit");
            let extra = match (info >> 24) & 0x1f {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => MEMBER_LEN * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                2 | 7..=12 | 16 | 18 => 0,
                kind => return Err(BtfError::UnknownKind(kind)),
            };
            at += TYPE_LEN + extra;
        }
        if at != types.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }
        Ok(Self { types, strings, starts })
    }

    fn name(&self, name_off: u32) -> Cow<'a, str> {
        let rest = usize::try_from(name_off).ok().and_then(|o| self.strings.get(o..)).unwrap_or_default();
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end])
    }

    /// `(kind, name_off, vlen, kind_flag, start)` of type `id`.
    fn header(&self, id: u32) -> Option<(u32, u32, usize, bool, usize)> {
        let start = *self.starts.get(usize::try_from(id).ok()?.checked_sub(1)?)?;
        let info = u32_at(self.types, start + 4)?;
        let vlen = usize::try_from(info & 0xffff).ok()?;
        Some(((info >> 24) & 0x1f, u32_at(self.types, start)?, vlen, info >> 31 == 1, start))
    }

    /// Byte offset of `member` in the struct named `name`, looking through anonymous structs and unions
    /// (as the kernel nests `sk_buff::sk`). `None` if there is no such struct or member, or the member
    /// is a bit field.
    #[must_use]
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let id = (1..=u32::try_from(self.starts.len()).ok()?).find(|&id| {
            self.header(id)
                .is_some_and(|(kind, name_off, ..)| kind == KIND_STRUCT && self.name(name_off) == name)
        })?;
        self.find_member(id, member, 0)
    }

    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let (kind, _, vlen, kind_flag, start) = self.header(id)?;
        if !matches!(kind, KIND_STRUCT | KIND_UNION) || depth > MAX_NESTING {
            return None;
        }
        (0..vlen).find_map(|i| {
            let m = start + TYPE_LEN + MEMBER_LEN * i;
            let (name_off, ty, offset) =
                (u32_at(self.types, m)?, u32_at(self.types, m + 4)?, u32_at(self.types, m + 8)?);
            let (bits, bit_offset) =
                if kind_flag { (offset >> 24, offset & 0x00ff_ffff) } else { (0, offset) };
            if bits != 0 || bit_offset % 8 != 0 {
                return None;
            }
            if name_off == 0 {
                return self.find_member(ty, member, depth + 1).map(|inner| bit_offset / 8 + inner);
            }
            (self.name(name_off) == member).then_some(bit_offset / 8)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob with `struct outer { int a; union { long x; int y; }; char z[4]; }` laid out by hand.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0x\0y\0z\0long\0char\0";
        let s = |name: &str| {
            let pat = [b"\0", name.as_bytes(), b"\0"].concat();
            u32::try_from(strings.windows(pat.len()).position(|w| w == pat).expect("string") + 1)
                .expect("fits")
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_ne_bytes()));
        push(&[s("int"), KIND_INT << 24, 4, 32]); // 1: int
        push(&[s("long"), KIND_INT << 24, 8, 64]); // 2: long
        push(&[s("char"), KIND_INT << 24, 1, 8]); // 3: char
        push(&[0, KIND_ARRAY << 24, 0, 3, 1, 4]); // 4: char[4]
        push(&[0, KIND_UNION << 24 | 2, 8, s("x"), 2, 0, s("y"), 1, 0]); // 5: anonymous union
        push(&[s("outer"), KIND_STRUCT << 24 | 3, 24, s("a"), 1, 0, 0, 5, 64, s("z"), 4, 128]); // 6
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_ne_bytes());
        b.extend_from_slice(&[1, 0]);
        let len = |v: &[u8]| u32::try_from(v.len()).expect("fits");
        for w in [24, 0, len(&types), len(&types), len(strings)] {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b.extend_from_slice(&types);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn finds_direct_and_nested_members() {
        let blob = blob();
        let btf = Btf::parse(&blob).expect("parse");
        assert_eq!(btf.member_offset("outer", "a"), Some(0));
        assert_eq!(btf.member_offset("outer", "x"), Some(8));
        assert_eq!(btf.member_offset("outer", "y"), Some(8));
        assert_eq!(btf.member_offset("outer", "z"), Some(16));
        assert_eq!(btf.member_offset("outer", "missing"), None);
        assert_eq!(btf.member_offset("nothing", "a"), None);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(Btf::parse(b"not btf at all, not at all").is_err());
        let blob = blob();
        assert!(Btf::parse(&blob[..blob.len() - 10]).is_err());
        assert!(Btf::parse(&blob[..30]).is_err());
    }

    #[test]
    fn reads_this_kernels_socket_buffer_layout() {
        let blob = Slurped::read(VMLINUX, MAX_VMLINUX).expect("kernel BTF (CONFIG_DEBUG_INFO_BTF)");
        let btf = Btf::parse(blob.bytes()).expect("the kernel's own BTF parses");
        // Stable for years on 64-bit kernels; a change would show up here first.
        assert_eq!(btf.member_offset("sk_buff", "sk"), Some(24));
        assert_eq!(btf.member_offset("sk_buff", "cb"), Some(40));
        assert!(btf.member_offset("tcp_sock", "copied_seq").is_some());
    }
}
