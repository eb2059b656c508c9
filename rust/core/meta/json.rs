//! A small strict JSON reader for the metadata member: enough to read what latentcache records
//! (objects, strings, integers), refusing whatever Python's `json.loads` might read differently.
//!
//! Its callers only ever use a parse to skip work (a size proven by a recorded fingerprint): a
//! document it refuses sends them the slow, full way, so refusing is always safe. It accepts a
//! subset of what `json.loads` accepts and reads that subset to the same values (the last of a
//! repeated key wins, as there).

/// A parsed JSON value. Numbers keep their text: only integers are ever compared.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Number(String),
    Str(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

/// The deepest nesting of arrays and objects read (deeper is refused).
const MAX_DEPTH: usize = 64;
/// The longest number read: Python's `json` refuses an integer of more digits than
/// `sys.get_int_max_str_digits()`, which is at least 640 when set (4300 by default).
const MAX_NUMBER_LEN: usize = 600;

impl Value {
    /// The value of `key` in an object (the last one, as `json.loads` keeps), or None.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(items) => items.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// An integer written as one (`-?digits`, no fraction or exponent) that fits an `i128`.
    pub(crate) fn as_int(&self) -> Option<i128> {
        match self {
            Value::Number(t) if !t.contains(['.', 'e', 'E']) => t.parse().ok(),
            _ => None,
        }
    }
}

/// Parse a whole document (whitespace around it allowed); None for anything else.
pub(crate) fn parse(bytes: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut p = Parser {
        b: text.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    (p.i == p.b.len()).then_some(v)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        self.ws();
        match *self.b.get(self.i)? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(Value::Str),
            b't' => self.word("true", Value::Bool(true)),
            b'f' => self.word("false", Value::Bool(false)),
            b'n' => self.word("null", Value::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn word(&mut self, w: &str, v: Value) -> Option<Value> {
        let end = self.i + w.len();
        (self.b.get(self.i..end)? == w.as_bytes()).then(|| {
            self.i = end;
            v
        })
    }

    fn object(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        let mut items = Vec::new();
        if self.eat(b'}') {
            return Some(Value::Object(items));
        }
        loop {
            self.ws();
            if self.b.get(self.i) != Some(&b'"') {
                return None;
            }
            let k = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            items.push((k, self.value(depth)?));
            if self.eat(b'}') {
                return Some(Value::Object(items));
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        let mut items = Vec::new();
        if self.eat(b']') {
            return Some(Value::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            if self.eat(b']') {
                return Some(Value::Array(items));
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, kept as text.
    fn number(&mut self) -> Option<Value> {
        let start = self.i;
        self.i += usize::from(self.b[self.i] == b'-');
        match self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if !self.b.get(self.i)?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !self.b.get(self.i)?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        // Python refuses integers of more digits than its limit, which can be set as low as 640.
        if self.i - start > MAX_NUMBER_LEN {
            return None;
        }
        // ASCII only, so the slice is valid UTF-8.
        Some(Value::Number(
            String::from_utf8_lossy(&self.b[start..self.i]).into_owned(),
        ))
    }

    fn digits(&mut self) {
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
    }

    /// A string at `"`; control characters refused (as `json.loads` does), escapes decoded, a
    /// lone surrogate refused (Python would keep it; Rust strings cannot).
    fn string(&mut self) -> Option<String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while let Some(&c) = self.b.get(self.i) {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.i += 1;
            }
            // The input is valid UTF-8 and the run stops only at ASCII bytes.
            out.push_str(std::str::from_utf8(&self.b[start..self.i]).ok()?);
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some(out);
                }
                b'\\' => {
                    let e = *self.b.get(self.i + 1)?;
                    self.i += 2;
                    out.push(match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode()?,
                        _ => return None,
                    });
                }
                _ => return None,
            }
        }
    }

    /// The character of a `\uXXXX` escape (just past `\u`), joining a surrogate pair.
    fn unicode(&mut self) -> Option<char> {
        let hi = self.hex4()?;
        if (0xD800..0xDC00).contains(&hi) {
            if self.b.get(self.i..self.i + 2)? != b"\\u" {
                return None;
            }
            self.i += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return None;
            }
            return char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00));
        }
        char::from_u32(hi)
    }

    fn hex4(&mut self) -> Option<u32> {
        let s = std::str::from_utf8(self.b.get(self.i..self.i + 4)?).ok()?;
        if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        self.i += 4;
        u32::from_str_radix(s, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Value {
        Value::Str(t.to_owned())
    }

    #[test]
    fn reads_what_the_writer_records() {
        let v = parse(br#"{"format":1,"source":{"hash":"crc32-64k:f01b","mtime_ns":1796551614201118285,"size":10068},"vae":"sha256:ab","writer":"latentcache 0.1.0"}"#).unwrap();
        let src = v.get("source").unwrap();
        assert_eq!(src.get("size").unwrap().as_int(), Some(10068));
        assert_eq!(
            src.get("mtime_ns").unwrap().as_int(),
            Some(1796551614201118285)
        );
        assert_eq!(v.get("vae"), Some(&s("sha256:ab")));
        assert_eq!(v.get("format").unwrap().as_int(), Some(1));
    }

    #[test]
    fn values_and_escapes() {
        let v = parse(
            br#" { "a" : [1, -0, 2.5, 1e3, -1E-2, true, false, null, {}, []], "b": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00" } "#,
        )
        .unwrap();
        let Value::Array(a) = v.get("a").unwrap() else {
            panic!("not an array")
        };
        assert_eq!(a.len(), 10);
        assert_eq!(a[0].as_int(), Some(1));
        assert_eq!(a[1].as_int(), Some(0));
        assert_eq!(a[2].as_int(), None, "a fraction is not an integer");
        assert_eq!(a[3].as_int(), None, "an exponent is not an integer");
        assert_eq!(
            v.get("b"),
            Some(&s("x\"\\/\u{8}\u{c}\n\r\t\u{e9}\u{1F600}"))
        );
    }

    #[test]
    fn the_last_of_a_repeated_key_wins() {
        let v = parse(br#"{"size": 1, "size": 2}"#).unwrap();
        assert_eq!(v.get("size").unwrap().as_int(), Some(2));
    }

    #[test]
    fn refuses_what_it_does_not_read_exactly() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\":1,}",
            b"[1,]",
            b"{\"a\" 1}",
            b"{a:1}",
            b"01",
            b"1.",
            b"1e",
            b"-",
            b"NaN",
            b"Infinity",
            b"-Infinity",
            b"{\"a\":1} x",
            b"\"\\ud800\"",
            b"\"\\udc00\"",
            b"\"\\x\"",
            b"\"a\nb\"",
            b"\"\\u12g4\"",
            b"\xff",
            b"tru",
            b"'a'",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn refuses_numbers_longer_than_python_always_reads() {
        let ok = format!("[{}]", "9".repeat(MAX_NUMBER_LEN));
        assert!(parse(ok.as_bytes()).is_some());
        for long in [
            format!("[{}]", "9".repeat(MAX_NUMBER_LEN + 1)),
            format!("[-{}]", "9".repeat(MAX_NUMBER_LEN)),
            format!("[1.{}]", "0".repeat(MAX_NUMBER_LEN)),
        ] {
            assert_eq!(parse(long.as_bytes()), None);
        }
    }

    #[test]
    fn refuses_deep_nesting_without_overflowing() {
        let deep = "[".repeat(100_000);
        assert_eq!(parse(deep.as_bytes()), None);
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(ok.as_bytes()).is_some());
        let over = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(parse(over.as_bytes()), None);
    }
}
