//! `.npy` headers (format 1.0, 2.0, 3.0) and the header-only index of an `.npz` built on them.
//!
//! The header dict is parsed by a small strict parser for exactly the literal numpy writes,
//! `{'descr': '<f4', 'fortran_order': False, 'shape': (16, 128, 128), }`, never a general Python
//! parser. Inside an intact zip, an array whose size disagrees with its header is *malformed*
//! (truncation is a property of the file, reported by the zip reader).
use std::fmt;
use std::fs::File;
use std::path::Path;

use crate::core::error::Result;
use crate::core::zip::{
    read_at, read_member_prefix_with, read_zip_index, stream_member, Compression, Member,
    ReadError, ReadErrorKind, ReadResult, Src,
};

/// `\x93NUMPY`.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// The most header bytes we read: magic, version, length and dict together.
pub const MAX_HEADER_LEN: usize = 64 << 10;
/// numpy's `max_header_size` for `np.load` (`format._MAX_HEADER_SIZE`): a longer header dict is
/// refused by numpy, and so here.
pub const NUMPY_MAX_HEADER_SIZE: usize = 10_000;
/// numpy's alignment of the array data (the header is padded to a multiple of this).
const ARRAY_ALIGN: usize = 64;
/// numpy pads the dict so the growth axis can reach this many digits in place.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;
/// The first read of a member: numpy writes 128-byte headers for the arrays of a cache; longer
/// headers (many dimensions, long descr) take a second read of exactly their length.
const FIRST_READ: usize = 256;

/// Byte order of a dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endian {
    Little,
    Big,
    /// One-byte types.
    NotApplicable,
}

/// The element types we support (numpy's bool, int, uint, float and complex).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScalarKind {
    Bool,
    I1,
    I2,
    I4,
    I8,
    U1,
    U2,
    U4,
    U8,
    F2,
    F4,
    F8,
    C8,
    C16,
}

/// A supported numpy dtype: element kind and byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DType {
    pub kind: ScalarKind,
    pub endian: Endian,
}

const NATIVE: Endian = if cfg!(target_endian = "little") {
    Endian::Little
} else {
    Endian::Big
};

impl DType {
    /// Bytes per element.
    pub fn itemsize(&self) -> u64 {
        use ScalarKind::*;
        match self.kind {
            Bool | I1 | U1 => 1,
            I2 | U2 | F2 => 2,
            I4 | U4 | F4 => 4,
            I8 | U8 | F8 | C8 => 8,
            C16 => 16,
        }
    }

    /// numpy's name ("float32", "int64", "bool", ...), without the byte order.
    pub fn name(&self) -> &'static str {
        use ScalarKind::*;
        match self.kind {
            Bool => "bool",
            I1 => "int8",
            I2 => "int16",
            I4 => "int32",
            I8 => "int64",
            U1 => "uint8",
            U2 => "uint16",
            U4 => "uint32",
            U8 => "uint64",
            F2 => "float16",
            F4 => "float32",
            F8 => "float64",
            C8 => "complex64",
            C16 => "complex128",
        }
    }

    pub fn is_integer(&self) -> bool {
        use ScalarKind::*;
        matches!(self.kind, I1 | I2 | I4 | I8 | U1 | U2 | U4 | U8)
    }

    pub fn is_float(&self) -> bool {
        matches!(self.kind, ScalarKind::F2 | ScalarKind::F4 | ScalarKind::F8)
    }

    /// True when the bytes can be read on this machine without swapping.
    pub fn is_native_order(&self) -> bool {
        self.endian == Endian::NotApplicable || self.endian == NATIVE
    }

    /// Parse numpy's `dtype.str` form (`<f4`, `|b1`, `=i8`, `f4`). `None` for anything else
    /// (strings, objects, datetimes, long doubles, ...).
    pub fn from_descr(descr: &str) -> Option<DType> {
        use ScalarKind::*;
        let (order, code) = match descr.as_bytes().first()? {
            b'<' | b'>' | b'|' | b'=' => (Some(descr.as_bytes()[0]), &descr[1..]),
            _ => (None, descr),
        };
        let kind = match code {
            "b1" | "?" => Bool,
            "i1" => I1,
            "i2" => I2,
            "i4" => I4,
            "i8" => I8,
            "u1" => U1,
            "u2" => U2,
            "u4" => U4,
            "u8" => U8,
            "f2" => F2,
            "f4" => F4,
            "f8" => F8,
            "c8" => C8,
            "c16" => C16,
            _ => return None,
        };
        let one_byte = matches!(kind, Bool | I1 | U1);
        let endian = match order {
            _ if one_byte => Endian::NotApplicable,
            Some(b'<') => Endian::Little,
            Some(b'>') => Endian::Big,
            _ => NATIVE,
        };
        Some(DType { kind, endian })
    }
}

impl fmt::Display for DType {
    /// The numpy name, with "(big-endian)" / "(little-endian)" when not in native order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if !self.is_native_order() {
            match self.endian {
                Endian::Big => f.write_str(" (big-endian)")?,
                _ => f.write_str(" (little-endian)")?,
            }
        }
        Ok(())
    }
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// The descr string as written (e.g. `<f4`).
    pub descr: String,
    pub dtype: DType,
    pub fortran_order: bool,
    pub shape: Vec<u64>,
    /// Bytes before the array data (magic, version, length field and padded dict).
    pub header_len: u64,
}

impl NpyHeader {
    /// Elements times itemsize, or `None` on overflow.
    pub fn data_len(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.itemsize(), |acc, &d| acc.checked_mul(d))
    }
}

/// Why a header did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NpyHeaderError {
    /// The bytes end before the header does; at least `needed` bytes are required.
    Incomplete { needed: usize },
    /// Not a valid header.
    Malformed(String),
    /// A valid header whose dtype we do not support (structured, string, object, ...).
    UnsupportedDtype { descr: String },
}

impl fmt::Display for NpyHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NpyHeaderError::Incomplete { needed } => {
                write!(f, "npy header is cut short (needs {needed} bytes)")
            }
            NpyHeaderError::Malformed(m) => write!(f, "bad npy header: {m}"),
            NpyHeaderError::UnsupportedDtype { descr } => write!(f, "unsupported dtype {descr}"),
        }
    }
}

fn malformed<T>(msg: impl Into<String>) -> std::result::Result<T, NpyHeaderError> {
    Err(NpyHeaderError::Malformed(msg.into()))
}

/// Parse a `.npy` header from the first bytes of an array file.
///
/// Args: `bytes`, the start of the `.npy` data (it may hold more than the header).
/// Returns: the header, or `Incomplete { needed }` when `bytes` is too short.
pub fn parse_npy_header(bytes: &[u8]) -> std::result::Result<NpyHeader, NpyHeaderError> {
    let have = bytes.len();
    if have < MAGIC.len() {
        if MAGIC.starts_with(bytes) {
            return Err(NpyHeaderError::Incomplete { needed: 10 });
        }
        return malformed("not an npy array (bad magic)");
    }
    if &bytes[..6] != MAGIC {
        return malformed("not an npy array (bad magic)");
    }
    if have < 8 {
        return Err(NpyHeaderError::Incomplete { needed: 10 });
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (prefix, dict_len) = match (major, minor) {
        (1, 0) => {
            if have < 10 {
                return Err(NpyHeaderError::Incomplete { needed: 10 });
            }
            (
                10usize,
                usize::from(u16::from_le_bytes([bytes[8], bytes[9]])),
            )
        }
        (2, 0) | (3, 0) => {
            if have < 12 {
                return Err(NpyHeaderError::Incomplete { needed: 12 });
            }
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (12usize, n as usize)
        }
        _ => return malformed(format!("unsupported npy format version {major}.{minor}")),
    };
    if dict_len > NUMPY_MAX_HEADER_SIZE {
        return malformed(format!(
            "header dict of {dict_len} bytes is longer than numpy's {NUMPY_MAX_HEADER_SIZE}-byte limit"
        ));
    }
    let header_len = match prefix.checked_add(dict_len) {
        Some(n) if n <= MAX_HEADER_LEN => n,
        _ => {
            return malformed(format!(
                "header of {dict_len} bytes is larger than the {MAX_HEADER_LEN}-byte limit"
            ))
        }
    };
    if have < header_len {
        return Err(NpyHeaderError::Incomplete { needed: header_len });
    }
    let dict = &bytes[prefix..header_len];
    let utf8 = major == 3;
    let (descr, fortran_order, shape) = parse_dict(dict, utf8)?;
    let descr = match descr {
        Descr::Str(s) => s,
        Descr::List(s) => return Err(NpyHeaderError::UnsupportedDtype { descr: s }),
    };
    let dtype = DType::from_descr(&descr).ok_or_else(|| NpyHeaderError::UnsupportedDtype {
        descr: descr.clone(),
    })?;
    Ok(NpyHeader {
        descr,
        dtype,
        fortran_order,
        shape,
        header_len: header_len as u64,
    })
}

#[derive(Debug)]
enum Descr {
    Str(String),
    /// A structured dtype's list, kept as text for messages.
    List(String),
}

struct Parser<'a> {
    b: &'a [u8],
    p: usize,
    utf8: bool,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.p < self.b.len() && matches!(self.b[self.p], b' ' | b'\t' | b'\n' | b'\r') {
            self.p += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.p).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.p += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), NpyHeaderError> {
        if self.eat(c) {
            Ok(())
        } else {
            malformed(format!(
                "expected '{}' at byte {} of the header dict",
                char::from(c),
                self.p
            ))
        }
    }

    fn text(&self, raw: &[u8]) -> String {
        if self.utf8 {
            String::from_utf8_lossy(raw).into_owned()
        } else {
            raw.iter().map(|&c| char::from(c)).collect()
        }
    }

    /// A quoted string without escapes (numpy never writes any in the keys or scalar descrs).
    fn string(&mut self) -> std::result::Result<String, NpyHeaderError> {
        self.ws();
        let q = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return malformed(format!("expected a string at byte {}", self.p)),
        };
        let start = self.p + 1;
        let Some(len) = self.b[start..].iter().position(|&c| c == q) else {
            return malformed("unterminated string");
        };
        let raw = &self.b[start..start + len];
        if raw.iter().any(|&c| c == b'\\' || c == b'\n') {
            return malformed("escapes are not allowed in header strings");
        }
        self.p = start + len + 1;
        Ok(self.text(raw))
    }

    fn word(&mut self, w: &[u8]) -> bool {
        self.ws();
        if self.b[self.p..].starts_with(w) {
            let after = self.b.get(self.p + w.len()).copied();
            if !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                self.p += w.len();
                return true;
            }
        }
        false
    }

    fn int(&mut self) -> std::result::Result<u64, NpyHeaderError> {
        self.ws();
        let start = self.p;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.p += 1;
        }
        let digits = &self.b[start..self.p];
        if digits.is_empty() {
            return malformed(format!("expected a non-negative integer at byte {start}"));
        }
        if digits.len() > 1 && digits[0] == b'0' {
            return malformed("integers with leading zeros are not valid");
        }
        // Python 2 era files may write `16L`.
        if self.peek() == Some(b'L') {
            self.p += 1;
        }
        std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map_or_else(|| malformed("shape dimension out of range"), Ok)
    }

    /// `()`, `(n,)`, `(a, b)`, `(a, b,)`. `(n)` is an int in Python, not a tuple: refused.
    fn shape(&mut self) -> std::result::Result<Vec<u64>, NpyHeaderError> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        if self.eat(b')') {
            return Ok(dims);
        }
        loop {
            if dims.len() >= 64 {
                return malformed("shape has more than 64 dimensions");
            }
            dims.push(self.int()?);
            if self.eat(b',') {
                if self.eat(b')') {
                    return Ok(dims);
                }
            } else if self.eat(b')') {
                if dims.len() == 1 {
                    return malformed("shape '(n)' is not a tuple");
                }
                return Ok(dims);
            } else {
                return malformed(format!("bad shape tuple at byte {}", self.p));
            }
        }
    }

    /// Skip a structured descr list, string-aware and balanced, returning its text.
    fn list(&mut self) -> std::result::Result<String, NpyHeaderError> {
        self.ws();
        let start = self.p;
        let mut depth = 0usize;
        while let Some(c) = self.peek() {
            match c {
                b'[' | b'(' | b'{' => depth += 1,
                b']' | b')' | b'}' => {
                    depth = match depth.checked_sub(1) {
                        Some(d) => d,
                        None => return malformed("unbalanced brackets in descr"),
                    };
                    if depth == 0 {
                        self.p += 1;
                        return Ok(self.text(&self.b[start..self.p]));
                    }
                }
                b'\'' | b'"' => {
                    let q = c;
                    self.p += 1;
                    while let Some(d) = self.peek() {
                        if d == b'\\' {
                            self.p += 1;
                        } else if d == q {
                            break;
                        }
                        self.p += 1;
                    }
                    if self.peek().is_none() {
                        return malformed("unterminated string in descr");
                    }
                }
                _ => {}
            }
            self.p += 1;
        }
        malformed("unterminated descr list")
    }
}

/// The exact text numpy writes, `{'descr': '<f4', 'fortran_order': False, 'shape': (16, 128, 128), }`
/// plus padding, parsed without the general parser; anything else returns None and takes the
/// general path, so this changes speed, never results.
fn parse_numpy_layout(dict: &[u8]) -> Option<(Descr, bool, Vec<u64>)> {
    let (descr, fortran, shape) = parse_numpy_layout_ref(dict)?;
    Some((Descr::Str(descr.to_owned()), fortran, shape.dims().to_vec()))
}

/// A shape of up to [`InlineShape::MAX`] dimensions, without an allocation. Longer shapes (numpy
/// allows 64) take the general parser.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InlineShape {
    dims: [u64; Self::MAX],
    len: usize,
}

impl InlineShape {
    pub(crate) const MAX: usize = 8;

    pub(crate) fn dims(&self) -> &[u64] {
        &self.dims[..self.len]
    }
}

/// [`parse_numpy_layout`] borrowing the descr from `dict` and keeping the shape inline.
pub(crate) fn parse_numpy_layout_ref(dict: &[u8]) -> Option<(&str, bool, InlineShape)> {
    let rest = dict.strip_prefix(b"{'descr': '")?;
    let q = rest.iter().position(|&c| c == b'\'')?;
    let descr = std::str::from_utf8(&rest[..q]).ok()?;
    if !descr
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'<' || c == b'>' || c == b'|' || c == b'=')
    {
        return None;
    }
    let rest = rest[q..].strip_prefix(b"', 'fortran_order': ")?;
    let (fortran, rest) = if let Some(r) = rest.strip_prefix(b"False") {
        (false, r)
    } else {
        (true, rest.strip_prefix(b"True")?)
    };
    let rest = rest.strip_prefix(b", 'shape': (")?;
    let close = rest.iter().position(|&c| c == b')')?;
    let (inner, rest) = (&rest[..close], &rest[close + 1..]);
    let mut shape = InlineShape {
        dims: [0; InlineShape::MAX],
        len: 0,
    };
    if !inner.is_empty() {
        let mut parts = inner.split(|&c| c == b',').peekable();
        while let Some(part) = parts.next() {
            let part = part.strip_prefix(b" ").unwrap_or(part);
            if part.is_empty() {
                // Only a trailing comma may leave an empty part, and only after one element: `(3,)`.
                if parts.peek().is_some() || shape.len != 1 {
                    return None;
                }
                continue;
            }
            if part.len() > 19
                || (part.len() > 1 && part[0] == b'0')
                || shape.len == InlineShape::MAX
            {
                return None;
            }
            // At most 19 digits: the value fits a u64 without overflow checks.
            let mut v = 0u64;
            for &c in part {
                if !c.is_ascii_digit() {
                    return None;
                }
                v = v * 10 + u64::from(c - b'0');
            }
            shape.dims[shape.len] = v;
            shape.len += 1;
        }
        // `(3)` is not a tuple: a single element needs its trailing comma.
        if shape.len == 1 && !inner.ends_with(b",") {
            return None;
        }
    }
    // numpy pads with spaces and ends the header with a newline.
    let rest = rest.strip_prefix(b", }")?;
    let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
    if !rest.iter().all(|&c| c == b' ') {
        return None;
    }
    Some((descr, fortran, shape))
}

fn parse_dict(
    dict: &[u8],
    utf8: bool,
) -> std::result::Result<(Descr, bool, Vec<u64>), NpyHeaderError> {
    match parse_numpy_layout(dict) {
        Some(parsed) => Ok(parsed),
        None => parse_dict_general(dict, utf8),
    }
}

fn parse_dict_general(
    dict: &[u8],
    utf8: bool,
) -> std::result::Result<(Descr, bool, Vec<u64>), NpyHeaderError> {
    if utf8 && std::str::from_utf8(dict).is_err() {
        return malformed("a version 3.0 header is not valid UTF-8");
    }
    let mut p = Parser {
        b: dict,
        p: 0,
        utf8,
    };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.expect(b':')?;
        match key.as_str() {
            "descr" if descr.is_none() => {
                p.ws();
                descr = Some(if p.peek() == Some(b'[') {
                    Descr::List(p.list()?)
                } else {
                    Descr::Str(p.string()?)
                });
            }
            "fortran_order" if fortran.is_none() => {
                fortran = Some(if p.word(b"True") {
                    true
                } else if p.word(b"False") {
                    false
                } else {
                    return malformed("fortran_order is not True or False");
                });
            }
            "shape" if shape.is_none() => shape = Some(p.shape()?),
            "descr" | "fortran_order" | "shape" => {
                return malformed(format!("duplicate key '{key}'"))
            }
            _ => return malformed(format!("unexpected key '{key}'")),
        }
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    p.ws();
    if p.p != dict.len() {
        return malformed("trailing bytes after the header dict");
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => malformed("the header dict lacks one of 'descr', 'fortran_order', 'shape'"),
    }
}

/// Python's `repr` of a shape tuple: `()`, `(3,)`, `(16, 2, 2)`.
pub fn shape_repr(shape: &[u64]) -> String {
    match shape {
        [] => "()".to_owned(),
        [n] => format!("({n},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(u64::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// The header numpy's `format.write_array` writes (same bytes: sorted keys, growth-axis spaces,
/// padding to 64 bytes, version 1.0 unless the dict needs 2.0 or 3.0).
pub fn encode_npy_header(descr: &str, fortran_order: bool, shape: &[u64]) -> Vec<u8> {
    let mut dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {}, }}",
        if fortran_order { "True" } else { "False" },
        shape_repr(shape)
    );
    if !shape.is_empty() {
        let axis = if fortran_order {
            shape[shape.len() - 1]
        } else {
            shape[0]
        };
        let digits = axis.to_string().len();
        dict.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(digits)));
    }
    let latin1 = dict.chars().all(|c| (c as u32) < 256);
    let body: Vec<u8> = if latin1 {
        dict.chars().map(|c| c as u8).collect()
    } else {
        dict.into_bytes()
    };
    let hlen = body.len() + 1;
    let wrap = |len_field: usize| {
        let pad = ARRAY_ALIGN - ((MAGIC.len() + 2 + len_field + hlen) % ARRAY_ALIGN);
        (pad, hlen + pad)
    };
    let (major, len_field) = if !latin1 {
        (3u8, 4usize)
    } else if wrap(2).1 <= usize::from(u16::MAX) {
        (1, 2)
    } else {
        (2, 4)
    };
    let (pad, total) = wrap(len_field);
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + len_field + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[major, 0]);
    if len_field == 2 {
        out.extend_from_slice(&(total as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(total as u32).to_le_bytes());
    }
    out.extend_from_slice(&body);
    out.resize(out.len() + pad, b' ');
    out.push(b'\n');
    out
}

/// One array of an npz: its member, header and where its data lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayEntry {
    /// The member name without `.npy` (numpy's key).
    pub key: String,
    pub member: Member,
    pub header: NpyHeader,
    /// Absolute file offset of the first array byte, for stored members.
    pub array_offset: Option<u64>,
    /// Bytes of array data (shape product times itemsize).
    pub array_len: u64,
}

/// An `.npy` member whose header is valid but whose dtype we do not support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedArray {
    pub key: String,
    pub member: Member,
    pub descr: String,
}

/// The header-only index of an npz.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpzIndex {
    pub file_len: u64,
    /// Arrays with a supported dtype, in archive order.
    pub arrays: Vec<ArrayEntry>,
    /// `.npy` members with a dtype outside [`ScalarKind`] (strings, objects, structured, ...).
    pub unsupported: Vec<UnsupportedArray>,
    /// Members whose name does not end in `.npy`.
    pub others: Vec<Member>,
    /// Whether any local header carries latentcache's alignment field (its writer's mark).
    pub writer_aligned: bool,
}

impl NpzIndex {
    pub fn get(&self, key: &str) -> Option<&ArrayEntry> {
        self.arrays.iter().find(|a| a.key == key)
    }

    pub fn get_unsupported(&self, key: &str) -> Option<&UnsupportedArray> {
        self.unsupported.iter().find(|a| a.key == key)
    }

    /// Every member of the archive, arrays first.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.arrays
            .iter()
            .map(|a| &a.member)
            .chain(self.unsupported.iter().map(|u| &u.member))
            .chain(self.others.iter())
    }
}

/// Read the zip index and every `.npy` header of an npz file through `src`, without reading
/// array data; `src`'s cached windows serve later small reads (the scalars next to the directory).
///
/// Returns: the arrays (key, header, data location), unsupported arrays and other members.
pub(crate) fn read_npz_index(src: &Src<'_>) -> ReadResult<NpzIndex> {
    let zip = read_zip_index(src)?;
    let mut index = NpzIndex {
        file_len: zip.file_len,
        arrays: Vec::new(),
        unsupported: Vec::new(),
        others: Vec::new(),
        writer_aligned: zip.writer_aligned,
    };
    for member in zip.members {
        let Some(key) = member.name.strip_suffix(".npy").map(str::to_owned) else {
            index.others.push(member);
            continue;
        };
        match index_npy_member(src, member, key)? {
            Indexed::Array(entry) => index.arrays.push(entry),
            Indexed::Unsupported(u) => index.unsupported.push(u),
        }
    }
    // np.load resolves key `k` to a member named exactly `k` before `k.npy`: refuse the pair
    // rather than read another array than numpy does.
    if let Some(bare) = index.others.iter().find(|m| {
        index.arrays.iter().any(|a| a.key == m.name)
            || index.unsupported.iter().any(|u| u.key == m.name)
    }) {
        let bare = bare.name.as_str();
        return Err(ReadError::new(
            ReadErrorKind::Malformed,
            src.path,
            Some(bare),
            format!("the archive holds both '{bare}' and '{bare}.npy', which np.load resolves to '{bare}'"),
        ));
    }
    Ok(index)
}

/// One `.npy` member as the index holds it.
pub(crate) enum Indexed {
    Array(ArrayEntry),
    Unsupported(UnsupportedArray),
}

/// Read and check one `.npy` member's header (`key` is its name less `.npy`): what makes a file
/// `malformed` member by member, shared by the index and by the writer, which drops a kept member
/// that would make its new file fail.
pub(crate) fn index_npy_member(src: &Src<'_>, member: Member, key: String) -> ReadResult<Indexed> {
    let path = src.path;
    let bad = |msg: String| ReadError::new(ReadErrorKind::Malformed, path, Some(&key), msg);
    let mut prefix = read_member_prefix_with(src, &member, FIRST_READ)?;
    let parsed = loop {
        match parse_npy_header(&prefix) {
            Err(NpyHeaderError::Incomplete { needed }) => {
                if (needed as u64) > member.uncompressed_size || prefix.len() >= needed {
                    break Err(NpyHeaderError::Malformed(format!(
                        "the member ({} bytes) ends inside its npy header ({needed} bytes)",
                        member.uncompressed_size
                    )));
                }
                prefix = read_member_prefix_with(src, &member, needed)?;
                if prefix.len() < needed {
                    break Err(NpyHeaderError::Malformed(format!(
                        "the npy header ({needed} bytes) could not be read from the member"
                    )));
                }
            }
            other => break other,
        }
    };
    let header = match parsed {
        Ok(h) => h,
        Err(NpyHeaderError::UnsupportedDtype { descr }) => {
            return Ok(Indexed::Unsupported(UnsupportedArray {
                key,
                member,
                descr,
            }));
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    let Some(array_len) = header.data_len() else {
        return Err(bad(format!(
            "shape {} of {} overflows",
            shape_repr(&header.shape),
            header.dtype.name()
        )));
    };
    let expected = header.header_len.checked_add(array_len);
    if expected != Some(member.uncompressed_size) {
        return Err(bad(format!(
            "header says {} {} ({array_len} data bytes after a {}-byte header) but the member holds {} bytes",
            header.dtype.name(),
            shape_repr(&header.shape),
            header.header_len,
            member.uncompressed_size
        )));
    }
    let array_offset = match member.compression {
        Compression::Stored => Some(member.data_offset + header.header_len),
        Compression::Deflated => None,
    };
    Ok(Indexed::Array(ArrayEntry {
        key,
        member,
        header,
        array_offset,
        array_len,
    }))
}

/// The raw array bytes of one entry (stored: one positional read; deflated: inflated, with the
/// size checked). Bytes are in the header's dtype and order.
pub fn read_array_bytes(file: &File, path: &Path, entry: &ArrayEntry) -> Result<Vec<u8>> {
    Ok(read_array_bytes_classified(file, path, entry)?)
}

/// [`read_array_bytes`] with the error kept classified.
pub fn read_array_bytes_classified(
    file: &File,
    path: &Path,
    entry: &ArrayEntry,
) -> ReadResult<Vec<u8>> {
    let ent = Some(entry.key.as_str());
    let len = usize::try_from(entry.array_len).map_err(|_| {
        ReadError::new(
            ReadErrorKind::Malformed,
            path,
            ent,
            "array is too large for memory",
        )
    })?;
    if let Some(off) = entry.array_offset {
        let file_len = file
            .metadata()
            .map_err(|e| ReadError::io(path, ent, e))?
            .len();
        if off
            .checked_add(entry.array_len)
            .is_none_or(|end| end > file_len)
        {
            return Err(ReadError::new(
                ReadErrorKind::Truncated,
                path,
                ent,
                "array data extends beyond the end of the file",
            ));
        }
        let mut buf = vec![0u8; len];
        read_at(file, &mut buf, off).map_err(|e| ReadError::io(path, ent, e))?;
        return Ok(buf);
    }
    // The size comes from the file: grow with the data rather than trusting it up front.
    let mut out = Vec::with_capacity(len.min(64 << 20));
    stream_array(file, path, entry, |chunk| {
        out.extend_from_slice(chunk);
        Ok(())
    })?;
    Ok(out)
}

/// Inflate a deflated array straight into `dst` (exactly its data length): no second buffer.
pub fn inflate_array_into(
    file: &File,
    path: &Path,
    entry: &ArrayEntry,
    dst: &mut [u8],
) -> ReadResult<()> {
    let mut at = 0usize;
    stream_array(file, path, entry, |chunk| {
        let end = at + chunk.len();
        if end > dst.len() {
            return Err(ReadError::new(
                ReadErrorKind::Malformed,
                path,
                Some(&entry.key),
                format!("array holds more than the {} bytes expected", dst.len()),
            ));
        }
        dst[at..end].copy_from_slice(chunk);
        at = end;
        Ok(())
    })
}

/// Feed an array's data (its member's bytes after the npy header) to `sink`, in chunks, and check
/// that exactly `array_len` bytes came.
fn stream_array(
    file: &File,
    path: &Path,
    entry: &ArrayEntry,
    mut sink: impl FnMut(&[u8]) -> ReadResult<()>,
) -> ReadResult<()> {
    let mut skip = entry.header.header_len as usize;
    let mut got = 0u64;
    stream_member(file, path, &entry.member, |chunk| {
        let s = skip.min(chunk.len());
        skip -= s;
        got += (chunk.len() - s) as u64;
        sink(&chunk[s..])
    })?;
    if got != entry.array_len {
        return Err(ReadError::new(
            ReadErrorKind::Malformed,
            path,
            Some(&entry.key),
            format!("array holds {got} bytes, expected {}", entry.array_len),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::encode_npy_header;
    use crate::core::zip::testutil::{zip_bytes, ZipOpts};

    /// The index of the file at `path` (tests' shorthand for open, size, index).
    pub fn index_at(path: &std::path::Path) -> crate::core::error::Result<super::NpzIndex> {
        let file = crate::core::file::open_regular(path)?;
        Ok(index_of_file(&file, path)?)
    }

    /// The zip index of the file at `path`.
    pub fn zip_index_at(
        path: &std::path::Path,
    ) -> crate::core::zip::ReadResult<crate::core::zip::ZipIndex> {
        let file = std::fs::File::open(path).unwrap();
        crate::core::zip::read_zip_index(&crate::core::zip::Src::new(&file, path)?)
    }

    /// The index of an open file, its error kept classified.
    pub fn index_of_file(
        file: &std::fs::File,
        path: &std::path::Path,
    ) -> crate::core::zip::ReadResult<super::NpzIndex> {
        super::read_npz_index(&crate::core::zip::Src::new(file, path)?)
    }

    /// An `.npy` image of `data` (already in the dtype's byte layout).
    pub fn npy(descr: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
        let mut v = encode_npy_header(descr, false, shape);
        v.extend_from_slice(data);
        v
    }

    pub fn f32s(vals: &[f32]) -> Vec<u8> {
        vals.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    pub fn zeros_f32(shape: &[u64]) -> Vec<u8> {
        npy(
            "<f4",
            shape,
            &vec![0u8; shape.iter().product::<u64>() as usize * 4],
        )
    }

    /// An sd-scripts cache as np.savez lays it out, for latents `(16, h, w)` (keys `_{h}x{w}`):
    /// latents, original_size, crop_ltrb, then the optional flipped latents, alpha mask
    /// `(8h, 8w)` and a second resolution `_{h/2}x{w/2}`, all zeros.
    pub fn savez_cache(
        hw: (u64, u64),
        flip: bool,
        alpha: bool,
        other_bucket: bool,
        zip64_local: bool,
    ) -> Vec<u8> {
        savez_cache_with(hw, flip, alpha, other_bucket, zip64_local, &[])
    }

    /// [`savez_cache`] with `extra` members (name with `.npy`, bytes) after the others.
    pub fn savez_cache_with(
        (h, w): (u64, u64),
        flip: bool,
        alpha: bool,
        other_bucket: bool,
        zip64_local: bool,
        extra: &[(String, Vec<u8>)],
    ) -> Vec<u8> {
        let sfx = format!("_{h}x{w}");
        let small_sfx = format!("_{}x{}", h / 2, w / 2);
        let size = npy("<i8", &[2], &[0u8; 16]);
        let crop = npy("<f8", &[4], &[0u8; 32]);
        let mut m: Vec<(String, Vec<u8>)> = vec![
            (format!("latents{sfx}.npy"), zeros_f32(&[16, h, w])),
            (format!("original_size{sfx}.npy"), size.clone()),
            (format!("crop_ltrb{sfx}.npy"), crop.clone()),
        ];
        if flip {
            m.push((format!("latents_flipped{sfx}.npy"), zeros_f32(&[16, h, w])));
        }
        if alpha {
            m.push((format!("alpha_mask{sfx}.npy"), zeros_f32(&[8 * h, 8 * w])));
        }
        if other_bucket {
            m.push((
                format!("latents{small_sfx}.npy"),
                zeros_f32(&[16, h / 2, w / 2]),
            ));
            m.push((format!("original_size{small_sfx}.npy"), size));
            m.push((format!("crop_ltrb{small_sfx}.npy"), crop));
        }
        m.extend(extra.iter().cloned());
        let members: Vec<(&str, &[u8], bool)> = m
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice(), false))
            .collect();
        zip_bytes(
            &members,
            ZipOpts {
                zip64_local,
                ..ZipOpts::default()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::core::zip::testutil::{mutate, temp_file, zip_bytes, ZipOpts};
    use proptest::prelude::*;

    fn hdr(dict: &str) -> std::result::Result<NpyHeader, NpyHeaderError> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        v.extend_from_slice(dict.as_bytes());
        parse_npy_header(&v)
    }

    #[test]
    fn parses_numpy_forms() {
        let h = hdr("{'descr': '<f4', 'fortran_order': False, 'shape': (16, 128, 128), }    \n")
            .unwrap();
        assert_eq!(
            h.dtype,
            DType {
                kind: ScalarKind::F4,
                endian: Endian::Little
            }
        );
        assert_eq!(h.shape, vec![16, 128, 128]);
        assert!(!h.fortran_order);
        assert_eq!(h.dtype.name(), "float32");
        assert_eq!(
            hdr("{'descr': '|b1', 'fortran_order': True, 'shape': (), }")
                .unwrap()
                .shape,
            Vec::<u64>::new()
        );
        assert_eq!(
            hdr("{'shape': (3,), 'descr': \"<i8\", 'fortran_order': False}")
                .unwrap()
                .shape,
            vec![3]
        );
        assert_eq!(
            hdr("{'descr': '>f4', 'fortran_order': False, 'shape': (3L, 2L)}")
                .unwrap()
                .dtype
                .endian,
            Endian::Big
        );
        assert_eq!(
            hdr("{'descr': '<u1', 'fortran_order': False, 'shape': (1, 2,), }")
                .unwrap()
                .dtype
                .endian,
            Endian::NotApplicable
        );
    }

    #[test]
    fn rejects_bad_headers() {
        for d in [
            "",
            "{",
            "{'descr': '<f4', 'fortran_order': False}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3), }",
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (03,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1}",
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,)} x",
            "{'descr': '<f4', 'fortran_order': Falsey, 'shape': (3,)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
        ] {
            assert!(
                matches!(hdr(d), Err(NpyHeaderError::Malformed(_))),
                "{d:?} -> {:?}",
                hdr(d)
            );
        }
        assert!(matches!(
            parse_npy_header(b"\x93NUMPY\x04\x00\x00\x00"),
            Err(NpyHeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse_npy_header(b"PK\x03\x04"),
            Err(NpyHeaderError::Malformed(_))
        ));
        assert_eq!(
            parse_npy_header(b"\x93NUM"),
            Err(NpyHeaderError::Incomplete { needed: 10 })
        );
        let big = b"\x93NUMPY\x02\x00\xff\xff\xff\x00";
        assert!(matches!(
            parse_npy_header(big),
            Err(NpyHeaderError::Malformed(_))
        ));
    }

    #[test]
    fn unsupported_dtypes() {
        for d in ["<U10", "|O", "<M8[ns]", "<f16", "|S3", "<V8"] {
            let dict = format!("{{'descr': '{d}', 'fortran_order': False, 'shape': (3,), }}");
            assert_eq!(
                hdr(&dict),
                Err(NpyHeaderError::UnsupportedDtype {
                    descr: d.to_owned()
                })
            );
        }
        let s = "{'descr': [('a', '<i4'), ('b]', [('c', '<f8', (2,))])], 'fortran_order': False, 'shape': (3,), }";
        assert!(
            matches!(hdr(s), Err(NpyHeaderError::UnsupportedDtype { .. })),
            "{:?}",
            hdr(s)
        );
    }

    #[test]
    fn encodes_like_numpy() {
        // Bytes from numpy 2.4: np.save of np.zeros((16, 2, 2), np.float32).
        let h = encode_npy_header("<f4", false, &[16, 2, 2]);
        assert_eq!(h.len(), 128);
        assert_eq!(&h[..10], b"\x93NUMPY\x01\x00\x76\x00");
        assert!(
            h[10..].starts_with(b"{'descr': '<f4', 'fortran_order': False, 'shape': (16, 2, 2), }")
        );
        assert_eq!(h[127], b'\n');
        let p = parse_npy_header(&h).unwrap();
        assert_eq!(p.header_len, 128);
    }

    fn npz_index(bytes: &[u8]) -> ReadResult<NpzIndex> {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        testutil::index_of_file(&f, t.path())
    }

    #[test]
    fn header_only_index_takes_one_read_per_region() {
        // Head (the first member's headers) and tail (directory and small members): two reads.
        // Each member in the middle of the file costs one more.
        for (extra_mid, budget) in [(false, 2), (true, 3)] {
            let t = temp_file(&savez_cache((128, 128), extra_mid, false, false, true));
            let f = File::open(t.path()).unwrap();
            let src = Src::new(&f, t.path()).unwrap();
            let idx = read_npz_index(&src).unwrap();
            assert_eq!(idx.arrays.len(), 3 + usize::from(extra_mid));
            assert_eq!(src.reads(), budget, "reads for extra_mid={extra_mid}");
        }
    }

    #[test]
    fn deflated_arrays_inflate_into_the_callers_buffer() {
        let vals: Vec<f32> = (0..3000).map(|i| (i % 17) as f32 * 0.5).collect();
        let lat = npy("<f4", &[3, 1000], &f32s(&vals));
        let z = zip_bytes(&[("lat.npy", &lat, true)], ZipOpts::default());
        let t = temp_file(&z);
        let f = File::open(t.path()).unwrap();
        let idx = testutil::index_of_file(&f, t.path()).unwrap();
        let entry = &idx.arrays[0];
        let mut dst = vec![0u8; entry.array_len as usize];
        inflate_array_into(&f, t.path(), entry, &mut dst).unwrap();
        assert_eq!(dst, f32s(&vals));
        assert_eq!(dst, read_array_bytes(&f, t.path(), entry).unwrap());
        // A destination too short for the data is an error, not a partial write past its end.
        let mut short = vec![0u8; 100];
        let e = inflate_array_into(&f, t.path(), entry, &mut short).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed);
    }

    #[test]
    fn indexes_stored_and_deflated() {
        let lat = npy("<f4", &[2, 3], &f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let size = npy(
            "<i8",
            &[2],
            &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
        );
        let s = npy("<U3", &[1], &[0u8; 12]);
        for deflated in [false, true] {
            let z = zip_bytes(
                &[
                    ("lat.npy", &lat, deflated),
                    ("size.npy", &size, deflated),
                    ("s.npy", &s, false),
                    ("meta.json", b"{}", false),
                ],
                ZipOpts::default(),
            );
            let t = temp_file(&z);
            let f = File::open(t.path()).unwrap();
            let idx = testutil::index_of_file(&f, t.path()).unwrap();
            assert_eq!(idx.arrays.len(), 2);
            assert_eq!(idx.unsupported.len(), 1);
            assert_eq!(idx.unsupported[0].descr, "<U3");
            assert_eq!(idx.others[0].name, "meta.json");
            let a = idx.get("lat").unwrap();
            assert_eq!(a.header.shape, vec![2, 3]);
            assert_eq!(a.array_len, 24);
            assert_eq!(a.array_offset.is_some(), !deflated);
            if let Some(off) = a.array_offset {
                assert_eq!(
                    &z[off as usize..off as usize + 24],
                    &f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[..]
                );
            }
            assert_eq!(
                read_array_bytes(&f, t.path(), a).unwrap(),
                f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            );
            assert_eq!(idx.members().count(), 4);
            let via_path = testutil::index_at(t.path()).unwrap();
            assert_eq!(via_path, idx);
        }
    }

    #[test]
    fn size_mismatch_is_malformed() {
        let mut lat = npy("<f4", &[2, 3], &f32s(&[1.0; 6]));
        lat.pop();
        let e = npz_index(&zip_bytes(&[("lat.npy", &lat, false)], ZipOpts::default())).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed);
        assert_eq!(e.entry.as_deref(), Some("lat"));
        let e = npz_index(&zip_bytes(
            &[("x.npy", b"\x93NUMPY\x01\x00\x70", false)],
            ZipOpts::default(),
        ))
        .unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed);
        let e = npz_index(&zip_bytes(
            &[("x.npy", b"not npy", true)],
            ZipOpts::default(),
        ))
        .unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed);
    }

    #[test]
    fn long_header_needs_second_read() {
        let shape: Vec<u64> = vec![1; 1500];
        let mut hdr = encode_npy_header("<f4", false, &shape);
        assert!(hdr.len() > FIRST_READ);
        hdr.extend_from_slice(&f32s(&[7.0]));
        for deflated in [false, true] {
            let idx = npz_index(&zip_bytes(&[("x.npy", &hdr, deflated)], ZipOpts::default()));
            // More than 64 dimensions is refused, but only after reading the whole header.
            let e = idx.unwrap_err();
            assert!(e.message.contains("64 dimensions"), "{e}");
        }
        // A structured dtype whose header is longer than the first read.
        let fields: Vec<String> = (0..400).map(|i| format!("('f{i}', '<f4')")).collect();
        let dict = format!(
            "{{'descr': [{}], 'fortran_order': False, 'shape': (1,), }}",
            fields.join(", ")
        );
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        v.extend_from_slice(dict.as_bytes());
        assert!(v.len() > FIRST_READ);
        v.extend_from_slice(&[0u8; 1600]);
        for deflated in [false, true] {
            let idx =
                npz_index(&zip_bytes(&[("x.npy", &v, deflated)], ZipOpts::default())).unwrap();
            assert!(idx.arrays.is_empty());
            assert!(idx.unsupported[0].descr.starts_with("[('f0', '<f4')"));
        }
    }

    const DESCRS: &[&str] = &[
        "|b1", "|i1", "<i2", "<i4", ">i8", "|u1", "<u2", ">u4", "<u8", "<f2", "<f4", ">f8", "<c8",
        "<c16",
    ];

    #[test]
    fn fast_path_agrees_with_the_general_parser() {
        let cases: &[&[u8]] = &[
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (16, 128, 128), }   ",
            b"{'descr': '<i8', 'fortran_order': True, 'shape': (2,), }",
            b"{'descr': '|u1', 'fortran_order': False, 'shape': (), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (3), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (3,,), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2,), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (,), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999999999,), }",
            b"{'descr': '<f8', 'fortran_order': Maybe, 'shape': (1,), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (1,), } x",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (03,), }",
            b"{'descr': '<f8', 'fortran_order': False, 'shape': (0, 3), }",
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (16, 128, 128), }   \n",
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (16, 128, 128), }  \n ",
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (16, 128, 128), }\n\n",
        ];
        for c in cases {
            if let Some(fast) = parse_numpy_layout(c) {
                let slow = parse_dict_general(c, false).unwrap();
                assert_eq!(
                    format!("{fast:?}"),
                    format!("{slow:?}"),
                    "{}",
                    String::from_utf8_lossy(c)
                );
            }
        }
        assert!(parse_numpy_layout(cases[0]).is_some());
        assert!(parse_numpy_layout(cases[3]).is_none());
        assert!(parse_numpy_layout(cases[4]).is_none());
        assert!(parse_numpy_layout(cases[6]).is_none());
        assert!(parse_numpy_layout(cases[10]).is_none());
        assert!(parse_numpy_layout(cases[11]).is_none());
        assert!(parse_numpy_layout(cases[12]).is_some());
        // numpy's own headers end with a newline: they must take the fast path.
        assert!(parse_numpy_layout(cases[13]).is_some());
        assert!(parse_numpy_layout(cases[14]).is_none());
        assert!(parse_numpy_layout(cases[15]).is_none());
        let h = encode_npy_header("<f4", false, &[16, 128, 128]);
        assert!(parse_numpy_layout(&h[10..]).is_some());
        // More dimensions than the inline shape holds: the general parser gives the same result.
        let dims: Vec<u64> = (1..=20).collect();
        let h = encode_npy_header("<f4", false, &dims);
        assert!(parse_numpy_layout(&h[10..]).is_none());
        assert_eq!(parse_npy_header(&h).unwrap().shape, dims);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)))]

        #[test]
        fn header_round_trips(
            d in 0..DESCRS.len(),
            fortran in any::<bool>(),
            shape in proptest::collection::vec(any::<u64>(), 0..6),
        ) {
            let h = encode_npy_header(DESCRS[d], fortran, &shape);
            prop_assert_eq!(h.len() % 64, 0);
            let p = parse_npy_header(&h).unwrap();
            prop_assert_eq!(&p.descr, DESCRS[d]);
            prop_assert_eq!(p.fortran_order, fortran);
            prop_assert_eq!(p.shape, shape);
            prop_assert_eq!(p.header_len as usize, h.len());
            for cut in [0, 5, 9, h.len() - 1] {
                let incomplete = matches!(parse_npy_header(&h[..cut]), Err(NpyHeaderError::Incomplete { .. }));
                prop_assert!(incomplete, "cut {}", cut);
            }
        }

        #[test]
        fn header_parser_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            use_valid in any::<bool>(),
        ) {
            let mut b = if use_valid { encode_npy_header("<f4", false, &[16, 4, 4]) } else { bytes };
            mutate(&mut b, &flips, None);
            let _ = parse_npy_header(&b);
        }

        #[test]
        fn npz_mutations_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..5),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
            deflated in any::<bool>(),
        ) {
            let lat = zeros_f32(&[4, 2, 2]);
            let size = npy("<i8", &[2], &[0u8; 16]);
            let mut b = zip_bytes(&[("lat.npy", &lat, deflated), ("size.npy", &size, false)], ZipOpts::default());
            mutate(&mut b, &flips, do_cut.then_some(cut));
            let t = temp_file(&b);
            let f = File::open(t.path()).unwrap();
            if let Ok(idx) = testutil::index_of_file(&f, t.path()) {
                for a in &idx.arrays {
                    let _ = read_array_bytes(&f, t.path(), a);
                }
            }
        }
    }
}
