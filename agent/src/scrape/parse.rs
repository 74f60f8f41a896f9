//! Parser for scraped bodies in the Prometheus text exposition format 0.0.4 and
//! the OpenMetrics 1.0 text format.
//!
//! The parser is a synchronous, pull-based, zero-copy state machine: the caller
//! hands it the whole body and pulls [`Entry`] values with
//! [`Parser::next_entry`] until `None`. Every string in an entry borrows from the
//! body; the only allocations happen for label values or help texts that carry
//! escape sequences (returned as [`Cow::Owned`]) and for errors.
//!
//! Acceptance follows Prometheus 2.42 (`model/textparse`): the text format is
//! lenient about whitespace and allows a trailing comma in label sets, while
//! OpenMetrics is strict (single spaces, no trailing comma, mandatory `# EOF`,
//! float-second timestamps, exemplars). A returned [`Sample`] is fully
//! validated, so iterating its labels cannot fail. After an error the parser
//! yields `None`; the caller is expected to abandon the scrape.
//!
//! Speed comes from working line by line with 16-byte SSE2 scans on x86_64
//! (byte loops elsewhere), an exact fast path for short decimal values, and
//! label iteration that pairs up quote positions from a bit mask when the
//! section has no escapes and no whitespace (what client libraries emit).
//!
//! Deliberate differences from Prometheus: a raw newline inside a quoted label
//! value is rejected in the text format too, duplicate label names (also in
//! exemplars) are a parse error, and OpenMetrics timestamps that do not fit an
//! `i64` of milliseconds are rejected instead of wrapping.

use std::borrow::Cow;
use std::fmt;

use memchr::memchr;

/// Bit pattern Prometheus stores for a scraped `NaN` (`value.NormalNaN`); it is
/// distinct from the staleness marker so a target cannot forge one.
pub const NORMAL_NAN_BITS: u64 = 0x7ff8_0000_0000_0001;

/// Most characters of the offending line quoted in a [`ParseError`].
const CONTEXT_CHARS: usize = 120;

/// Exposition format of a scraped body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0 text format.
    OpenMetrics,
}

impl Format {
    /// Picks the format from a `Content-Type` header value: the media type
    /// `application/openmetrics-text` (any case, any parameters) selects
    /// OpenMetrics, anything else the Prometheus text format.
    pub fn from_content_type(ct: &str) -> Format {
        let media = ct.split(';').next().unwrap_or_default().trim();
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// Metric family type announced by a `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    /// `untyped` in the text format, `unknown` in OpenMetrics.
    Unknown,
}

impl MetricType {
    /// The OpenMetrics spelling of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
            MetricType::GaugeHistogram => "gaugehistogram",
            MetricType::Summary => "summary",
            MetricType::Info => "info",
            MetricType::StateSet => "stateset",
            MetricType::Unknown => "unknown",
        }
    }

    fn parse(text: &[u8], format: Format) -> Option<MetricType> {
        let om = format == Format::OpenMetrics;
        Some(match text {
            b"counter" => MetricType::Counter,
            b"gauge" => MetricType::Gauge,
            b"histogram" => MetricType::Histogram,
            b"summary" => MetricType::Summary,
            b"untyped" if !om => MetricType::Unknown,
            b"unknown" if om => MetricType::Unknown,
            b"gaugehistogram" if om => MetricType::GaugeHistogram,
            b"info" if om => MetricType::Info,
            b"stateset" if om => MetricType::StateSet,
            _ => return None,
        })
    }
}

/// One item of a scraped body.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry<'a> {
    Sample(Sample<'a>),
    Type {
        metric: &'a str,
        kind: MetricType,
    },
    /// `text` is unescaped; it borrows from the body unless it had escapes.
    Help {
        metric: &'a str,
        text: Cow<'a, str>,
    },
    /// OpenMetrics only; `unit` is empty or a `_`-separated suffix of `metric`.
    Unit {
        metric: &'a str,
        unit: &'a str,
    },
}

/// One validated sample line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample<'a> {
    /// The raw bytes `name{labels}` exactly as in the input (a cache key).
    pub series: &'a [u8],
    pub name: &'a str,
    /// A scraped `NaN` always has the bits [`NORMAL_NAN_BITS`].
    pub value: f64,
    /// Explicit timestamp in milliseconds (OpenMetrics seconds are converted).
    pub timestamp_ms: Option<i64>,
    /// OpenMetrics exemplar, only on `_total` and `_bucket` series.
    pub exemplar: Option<Exemplar<'a>>,
    labels: RawLabels<'a>,
}

impl<'a> Sample<'a> {
    /// The label pairs in input order, values unescaped.
    pub fn labels(&self) -> LabelIter<'a> {
        LabelIter::new(self.labels)
    }

    /// Number of label pairs (what [`Sample::labels`] yields).
    pub fn label_count(&self) -> usize {
        self.labels.count as usize
    }
}

/// An OpenMetrics exemplar: ` # {labels} value [timestamp]` after a sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar<'a> {
    pub value: f64,
    pub timestamp_ms: Option<i64>,
    labels: RawLabels<'a>,
}

impl<'a> Exemplar<'a> {
    /// The exemplar's label pairs in input order, values unescaped.
    pub fn labels(&self) -> LabelIter<'a> {
        LabelIter::new(self.labels)
    }

    /// Number of label pairs.
    pub fn label_count(&self) -> usize {
        self.labels.count as usize
    }
}

/// A validated label section (the bytes between `{` and `}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RawLabels<'a> {
    bytes: &'a [u8],
    count: u32,
    /// Validated by [`simple_labels`]: `name="value"` pairs joined by single
    /// commas, no whitespace, no escapes.
    simple: bool,
}

/// Iterator over `(name, value)` label pairs of a validated label section.
#[derive(Clone, Debug)]
pub struct LabelIter<'a> {
    bytes: &'a [u8],
    pos: usize,
    simple: bool,
    /// Simple sections: positions (relative to `base`) of the quotes not yet
    /// consumed in the current window.
    quotes: u64,
    base: usize,
}

impl<'a> LabelIter<'a> {
    fn new(raw: RawLabels<'a>) -> Self {
        LabelIter {
            bytes: raw.bytes,
            pos: 0,
            simple: raw.simple,
            quotes: 0,
            base: 0,
        }
    }
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = (&'a str, Cow<'a, str>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.simple {
            if self.pos >= self.bytes.len() {
                return None;
            }
            // Quotes pair up (no escapes): take the next two from the window.
            if self.quotes & self.quotes.wrapping_sub(1) == 0 {
                self.base = self.pos;
                self.quotes = quote_mask(self.bytes, self.pos);
            }
            if self.quotes & self.quotes.wrapping_sub(1) != 0 {
                let open = self.base + self.quotes.trailing_zeros() as usize;
                self.quotes &= self.quotes - 1;
                let close = self.base + self.quotes.trailing_zeros() as usize;
                self.quotes &= self.quotes - 1;
                let name = self.bytes.get(self.pos..open.checked_sub(1)?)?;
                let value = self.bytes.get(open + 1..close)?;
                self.pos = close + 2;
                // SAFETY: validated section: ASCII names, UTF-8 values.
                return Some(unsafe { (assume_utf8(name), Cow::Borrowed(assume_utf8(value))) });
            }
            // A value longer than the window: scan this pair below.
            self.quotes = 0;
        }
        let mut rest = self.bytes.get(self.pos..)?;
        let (name, value, escaped) = next_raw_label(&mut rest)?;
        // Simple sections expect `pos` at a name: step over the comma.
        self.pos = self.bytes.len() - rest.len() + usize::from(self.simple);
        // SAFETY: the parser validated the section before building the
        // iterator: names are ASCII and values are valid UTF-8.
        let (name, value) = unsafe { (assume_utf8(name), assume_utf8(value)) };
        if escaped {
            return Some((name, unescape(value, true)));
        }
        Some((name, Cow::Borrowed(value)))
    }
}

/// A malformed body. The caller should abandon the scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong, e.g. `expected label value, got '}'`.
    pub message: String,
    /// The offending line, lossily decoded and truncated.
    pub context: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at line {}", self.message, self.line)?;
        if !self.context.is_empty() {
            write!(f, ": {}", self.context)?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

impl ParseError {
    /// OpenMetrics data after `# EOF`, found at `line` of a streamed body.
    pub fn after_eof(line: usize) -> Self {
        ParseError {
            line,
            message: "unexpected data after # EOF".to_owned(),
            context: String::new(),
        }
    }
}

/// Pull parser over one scraped body.
#[derive(Clone, Debug)]
pub struct Parser<'a> {
    body: &'a [u8],
    pos: usize,
    line_no: usize,
    format: Format,
    done: bool,
    /// The body ends with this slice (else more chunks follow).
    last: bool,
    /// OpenMetrics `# EOF` was read.
    eof: bool,
}

impl<'a> Parser<'a> {
    /// A parser over a whole body.
    pub fn new(body: &'a [u8], format: Format) -> Self {
        Self::chunk(body, format, 0, true)
    }

    /// A parser over one piece of a streamed body: `body` holds whole lines (it ends with a
    /// newline unless `last`), the first of them line `lines_before + 1`. Only the `last`
    /// piece checks how the body ends (OpenMetrics `# EOF`).
    pub fn chunk(body: &'a [u8], format: Format, lines_before: usize, last: bool) -> Self {
        Parser {
            body,
            pos: 0,
            line_no: lines_before,
            format,
            done: false,
            last,
            eof: false,
        }
    }

    /// Whether an OpenMetrics `# EOF` line was read: nothing may follow it.
    pub fn saw_eof(&self) -> bool {
        self.eof
    }

    /// The next entry, `None` at the end of the body or after an error.
    pub fn next_entry(&mut self) -> Option<Result<Entry<'a>, ParseError>> {
        while !self.done {
            let body = self.body;
            let start = self.pos;
            if start >= body.len() {
                self.done = true;
                if self.format == Format::OpenMetrics && self.last && !self.eof {
                    let fail = fail_msg("data does not end with # EOF");
                    return Some(Err(self.error(fail, b"", false)));
                }
                return None;
            }
            let rest = &body[start..];
            let (line, has_nl) = match find_newline(rest) {
                Some(end) => (&rest[..end], true),
                None => (rest, false),
            };
            self.pos = start + line.len() + usize::from(has_nl);
            self.line_no += 1;
            let outcome = match self.format {
                Format::Text => text_line(line),
                Format::OpenMetrics => self.om_line(line, has_nl),
            };
            match outcome {
                Ok(Some(entry)) => return Some(Ok(entry)),
                Ok(None) => {}
                Err(fail) => {
                    self.done = true;
                    return Some(Err(self.error(fail, line, has_nl)));
                }
            }
        }
        None
    }

    /// Number of the line the last entry or error came from (1-based).
    pub fn line(&self) -> usize {
        self.line_no
    }

    fn om_line(&mut self, line: &'a [u8], has_nl: bool) -> Result<Option<Entry<'a>>, Fail> {
        let entry = match line.first() {
            Some(&b) if has(b, C_NAME_START) => Entry::Sample(om_sample(line)?),
            Some(b'#') if line == b"# EOF" => {
                if self.pos < self.body.len() {
                    return Err(fail_msg("unexpected data after # EOF"));
                }
                self.done = true;
                self.eof = true;
                return Ok(None);
            }
            Some(b'#') if line.starts_with(b"# EOF") => return Err(fail_msg("unexpected data after # EOF")),
            Some(b'#') => om_meta(line)?,
            _ => return Err(Fail::Expected("a metric name or '# '", 0)),
        };
        if !has_nl {
            return Err(fail_msg("data does not end with # EOF"));
        }
        Ok(Some(entry))
    }

    #[cold]
    #[inline(never)]
    fn error(&self, fail: Fail, line: &[u8], has_nl: bool) -> ParseError {
        let message = match fail {
            Fail::Expected(what, at) => {
                let got = match line.get(at) {
                    Some(&b) => format!("'{}'", b.escape_ascii()),
                    None if has_nl => "end of line".to_owned(),
                    None => "end of input".to_owned(),
                };
                format!("expected {what}, got {got}")
            }
            Fail::Msg(msg) => msg.into_owned(),
        };
        ParseError {
            line: self.line_no.max(1),
            message,
            context: context(line),
        }
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = Result<Entry<'a>, ParseError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.next_entry()
    }
}

#[cold]
#[inline(never)]
fn fail_msg(msg: &'static str) -> Fail {
    Fail::Msg(Cow::Borrowed(msg))
}

/// Why a line was rejected; turned into a [`ParseError`] with line context.
#[derive(Debug)]
enum Fail {
    /// `expected {0}, got <byte at {1} in the line>`.
    Expected(&'static str, usize),
    Msg(Cow<'static, str>),
}

// ---------------------------------------------------------------------------
// Byte classes and scans

const C_NAME_START: u8 = 1; // [a-zA-Z_:]
const C_NAME: u8 = 1 << 1; // [a-zA-Z0-9_:]
const C_LABEL_START: u8 = 1 << 2; // [a-zA-Z_]
const C_LABEL: u8 = 1 << 3; // [a-zA-Z0-9_]
const C_WS: u8 = 1 << 4; // [ \t]
const C_TEXT_VALUE_END: u8 = 1 << 5; // [ \t{]: ends a text-format value token

static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        let letter = b.is_ascii_alphabetic() || b == b'_';
        let mut class = 0;
        if letter || b == b':' {
            class |= C_NAME_START | C_NAME;
        }
        if letter {
            class |= C_LABEL_START | C_LABEL;
        }
        if b.is_ascii_digit() {
            class |= C_NAME | C_LABEL;
        }
        if b == b' ' || b == b'\t' {
            class |= C_WS | C_TEXT_VALUE_END;
        }
        if b == b'{' {
            class |= C_TEXT_VALUE_END;
        }
        table[i] = class;
        i += 1;
    }
    table
};

#[inline(always)]
fn has(b: u8, class: u8) -> bool {
    CLASS[b as usize] & class != 0
}

/// Index of the first byte at or after `i` that is not in `class`.
#[inline(always)]
fn scan(line: &[u8], mut i: usize, class: u8) -> usize {
    while i < line.len() && has(line[i], class) {
        i += 1;
    }
    i
}

/// Index of the first byte at or after `i` that cannot continue a metric name
/// (`colon`) or a label name.
#[inline(always)]
fn scan_ident(line: &[u8], i: usize, colon: bool) -> usize {
    #[cfg(target_arch = "x86_64")]
    if let Some(end) = simd_scan(line, i, |chunk, skip| simd::non_ident(chunk, colon) >> skip) {
        return end;
    }
    scan(line, i, if colon { C_NAME } else { C_LABEL })
}

/// Index of the first `"` or `\\` at or after `i` (`line.len()` if none);
/// sets `non_ascii` if a byte before it is not ASCII.
#[inline(always)]
fn find_quote(line: &[u8], mut i: usize, non_ascii: &mut bool) -> usize {
    #[cfg(target_arch = "x86_64")]
    if let Some(end) = simd_scan(line, i, |chunk, skip| {
        let (stop, high) = simd::quote_or_backslash(chunk);
        let (stop, high) = (stop >> skip, high >> skip);
        // Bits below the first stop bit (all bits if there is none).
        let before = (stop & stop.wrapping_neg()).wrapping_sub(1);
        *non_ascii |= high & before != 0;
        stop
    }) {
        return end;
    }
    while i < line.len() {
        let b = line[i];
        if b == b'"' || b == b'\\' {
            break;
        }
        *non_ascii |= !b.is_ascii();
        i += 1;
    }
    i
}

/// End of a text-format value token: the first ` `, `\t` or `{` at or after
/// `i`, else the line end.
#[inline(always)]
fn text_value_end(line: &[u8], i: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if let Some(end) = simd_scan(line, i, |chunk, skip| simd::value_end(chunk) >> skip) {
        return end;
    }
    let mut i = i;
    while i < line.len() && !has(line[i], C_TEXT_VALUE_END) {
        i += 1;
    }
    i
}

/// Runs `flagged` over `hay[i..]` in 16-byte chunks and returns the index of
/// the first flagged byte (`hay.len()` if none), or `None` if `hay` is shorter
/// than one chunk. The last chunk is the final 16 bytes of `hay`, overlapping
/// already scanned ones; `flagged` gets the number of leading bytes to ignore
/// and must shift its mask right by it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn simd_scan(hay: &[u8], mut i: usize, mut flagged: impl FnMut(&[u8; 16], usize) -> u32) -> Option<usize> {
    let last_start = hay.len().checked_sub(16)?;
    loop {
        let start = i.min(last_start);
        let chunk = hay[start..].first_chunk::<16>()?;
        let mask = flagged(chunk, i - start);
        if mask != 0 {
            return Some(i + mask.trailing_zeros() as usize);
        }
        if start == last_start {
            return Some(hay.len());
        }
        i += 16;
    }
}

/// Index of the first `\n` in `rest`. Most lines are short, so the first
/// [`INLINE_NEWLINE_SCAN`] bytes are searched inline before paying for a
/// `memchr` call.
#[inline(always)]
fn find_newline(rest: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut i = 0;
        while i < INLINE_NEWLINE_SCAN {
            let Some(chunk) = rest[i..].first_chunk::<16>() else {
                break;
            };
            let found = simd::newline(chunk);
            if found != 0 {
                return Some(i + found.trailing_zeros() as usize);
            }
            i += 16;
        }
        memchr(b'\n', &rest[i..]).map(|at| i + at)
    }
    #[cfg(not(target_arch = "x86_64"))]
    memchr(b'\n', rest)
}

#[cfg(target_arch = "x86_64")]
const INLINE_NEWLINE_SCAN: usize = 128;

/// SSE2 versions of the hot byte scans, 16 bytes at a time. Each returns a
/// bit mask with bit `n` set for byte `n`.
///
/// SAFETY (all `unsafe` blocks below): SSE2 is part of the x86_64 baseline, so
/// the intrinsics are always available; loads read exactly the 16 bytes of a
/// `&[u8; 16]` with an unaligned load.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Bytes in `lo..lo + len` (unsigned), via a bias into the signed range.
    #[inline(always)]
    unsafe fn in_range(v: __m128i, lo: u8, len: u8) -> __m128i {
        unsafe {
            let biased = _mm_add_epi8(v, _mm_set1_epi8(0x80u8.wrapping_sub(lo) as i8));
            _mm_cmplt_epi8(biased, _mm_set1_epi8(0x80u8.wrapping_add(len) as i8))
        }
    }

    /// Bytes that are not `[a-zA-Z0-9_]` (plus `:` if `colon`).
    #[inline(always)]
    pub(super) fn non_ident(chunk: &[u8; 16], colon: bool) -> u32 {
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            let alpha = in_range(_mm_or_si128(v, _mm_set1_epi8(0x20)), b'a', 26);
            // `:` directly follows `9`.
            let digit = in_range(v, b'0', if colon { 11 } else { 10 });
            let under = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'_' as i8));
            let ok = _mm_or_si128(_mm_or_si128(alpha, digit), under);
            (_mm_movemask_epi8(ok) as u32) ^ 0xffff
        }
    }

    /// ` `, `\t` and `{` bytes.
    #[inline(always)]
    pub(super) fn value_end(chunk: &[u8; 16]) -> u32 {
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            let space = _mm_cmpeq_epi8(v, _mm_set1_epi8(b' ' as i8));
            let tab = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\t' as i8));
            let brace = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'{' as i8));
            _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(space, tab), brace)) as u32
        }
    }

    /// `"` bytes.
    #[inline(always)]
    pub(super) fn quotes(chunk: &[u8; 16]) -> u32 {
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8))) as u32
        }
    }

    /// `\n` bytes.
    #[inline(always)]
    pub(super) fn newline(chunk: &[u8; 16]) -> u32 {
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8))) as u32
        }
    }

    /// (`"` or `\\` bytes, non-ASCII bytes).
    #[inline(always)]
    pub(super) fn quote_or_backslash(chunk: &[u8; 16]) -> (u32, u32) {
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            let stop = _mm_or_si128(quote, backslash);
            (_mm_movemask_epi8(stop) as u32, _mm_movemask_epi8(v) as u32)
        }
    }
}

#[inline(always)]
fn skip_ws(line: &[u8], i: usize) -> usize {
    scan(line, i, C_WS)
}

/// `from_utf8` with an inlined ASCII fast path.
#[inline]
fn to_str(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { assume_utf8(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// # Safety
/// `bytes` must be valid UTF-8.
#[inline(always)]
unsafe fn assume_utf8(bytes: &[u8]) -> &str {
    debug_assert!(std::str::from_utf8(bytes).is_ok());
    // SAFETY: guaranteed by the caller.
    unsafe { std::str::from_utf8_unchecked(bytes) }
}

// ---------------------------------------------------------------------------
// Prometheus text format

#[inline(always)]
fn text_line(line: &[u8]) -> Result<Option<Entry<'_>>, Fail> {
    let Some(&first) = line.first() else {
        return Ok(None);
    };
    if has(first, C_NAME_START) {
        return text_sample(line, 0).map(|s| Some(Entry::Sample(s)));
    }
    let i = skip_ws(line, 0);
    match line.get(i) {
        None => Ok(None),
        Some(b'#') => text_comment(line, i + 1),
        Some(&b) if has(b, C_NAME_START) => text_sample(line, i).map(|s| Some(Entry::Sample(s))),
        Some(_) => Err(Fail::Expected("a metric name or comment", i)),
    }
}

/// `# HELP` / `# TYPE` lines; any other comment is skipped. `i` is just after `#`.
fn text_comment(line: &[u8], i: usize) -> Result<Option<Entry<'_>>, Fail> {
    if !line.get(i).is_some_and(|&b| has(b, C_WS)) {
        return Ok(None);
    }
    let i = skip_ws(line, i);
    let keyword = match line.get(i..i + 4) {
        Some(b"HELP") => "HELP",
        Some(b"TYPE") => "TYPE",
        _ => return Ok(None),
    };
    if !line.get(i + 4).is_some_and(|&b| has(b, C_WS)) {
        return Ok(None);
    }
    let start = skip_ws(line, i + 4);
    if !line.get(start).is_some_and(|&b| has(b, C_NAME_START)) {
        let what = if keyword == "HELP" {
            "metric name after HELP"
        } else {
            "metric name after TYPE"
        };
        return Err(Fail::Expected(what, start));
    }
    let end = scan_ident(line, start + 1, true);
    // SAFETY: metric names are ASCII.
    let metric = unsafe { assume_utf8(&line[start..end]) };
    // Like Prometheus, the text is everything after the one byte following the name.
    let text = line.get(end + 1..).unwrap_or_default();
    meta_entry(keyword, metric, text, Format::Text).map(Some)
}

#[inline(always)]
fn text_sample(line: &[u8], start: usize) -> Result<Sample<'_>, Fail> {
    let name_end = scan_ident(line, start + 1, true);
    let mut series_end = name_end;
    let mut labels = RawLabels::default();
    let mut i = skip_ws(line, name_end);
    if line.get(i) == Some(&b'{') {
        // Clients emit the strict OpenMetrics shape; only fall back to the
        // lenient grammar (whitespace, optional commas) when that fails.
        let close;
        (close, labels) = match om_labels(line, i + 1) {
            Ok(strict) => strict,
            Err(_) => text_labels(line, i + 1)?,
        };
        series_end = close + 1;
        i = skip_ws(line, close + 1);
    }
    let value_start = i;
    i = text_value_end(line, i);
    if i == value_start {
        return Err(Fail::Expected("value after metric", i));
    }
    let value = parse_value(&line[value_start..i]).map_err(|e| e.fail(&line[value_start..i]))?;
    let mut timestamp_ms = None;
    i = skip_ws(line, i);
    if i < line.len() {
        if !line[i].is_ascii_digit() {
            return Err(Fail::Expected("timestamp or end of line", i));
        }
        let ts_start = i;
        while i < line.len() && line[i].is_ascii_digit() {
            i += 1;
        }
        timestamp_ms = Some(parse_int_timestamp(&line[ts_start..i])?);
        i = skip_ws(line, i);
        if i < line.len() {
            return Err(Fail::Expected("end of line after timestamp", i));
        }
    }
    Ok(Sample {
        series: &line[start..series_end],
        // SAFETY: metric names are ASCII.
        name: unsafe { assume_utf8(&line[start..name_end]) },
        value,
        timestamp_ms,
        exemplar: None,
        labels,
    })
}

/// Validates a text-format label section starting just after `{`; returns the
/// index of the closing `}`. Whitespace is allowed between all tokens, commas
/// are optional and a trailing comma is fine (as in Prometheus).
#[inline(never)]
fn text_labels(line: &[u8], start: usize) -> Result<(usize, RawLabels<'_>), Fail> {
    let mut dups = DupCheck::default();
    let mut escaped = false;
    let mut i = start;
    loop {
        i = skip_ws(line, i);
        match line.get(i) {
            Some(b'}') => break,
            Some(&b) if has(b, C_LABEL_START) => {}
            _ => return Err(Fail::Expected("label name", i)),
        }
        let name_start = i;
        i = scan_ident(line, i + 1, false);
        dups.add(&line[start..name_start], &line[name_start..i])?;
        i = skip_ws(line, i);
        if line.get(i) != Some(&b'=') {
            return Err(Fail::Expected("'='", i));
        }
        i = skip_ws(line, i + 1);
        if line.get(i) != Some(&b'"') {
            return Err(Fail::Expected("label value", i));
        }
        i = quoted_value_end(line, i + 1, &mut escaped)?;
        i = skip_ws(line, i);
        if line.get(i) == Some(&b',') {
            i += 1;
        }
    }
    let labels = RawLabels {
        bytes: &line[start..i],
        count: dups.count,
        simple: false,
    };
    Ok((i, labels))
}

// ---------------------------------------------------------------------------
// OpenMetrics

/// `# HELP|TYPE|UNIT name text` (`# EOF` is handled by the caller).
fn om_meta(line: &[u8]) -> Result<Entry<'_>, Fail> {
    if line.get(1) != Some(&b' ') {
        return Err(Fail::Expected("' ' after '#'", 1));
    }
    let (keyword, what) = match line.get(2..7) {
        Some(b"HELP ") => ("HELP", "metric name after HELP"),
        Some(b"TYPE ") => ("TYPE", "metric name after TYPE"),
        Some(b"UNIT ") => ("UNIT", "metric name after UNIT"),
        _ => return Err(fail_msg("expected HELP, TYPE, UNIT or EOF after '# '")),
    };
    if !line.get(7).is_some_and(|&b| has(b, C_NAME_START)) {
        return Err(Fail::Expected(what, 7));
    }
    let end = scan_ident(line, 8, true);
    if line.get(end) != Some(&b' ') {
        return Err(Fail::Msg(format!("expected text in {keyword}").into()));
    }
    // SAFETY: metric names are ASCII.
    let metric = unsafe { assume_utf8(&line[7..end]) };
    meta_entry(keyword, metric, &line[end + 1..], Format::OpenMetrics)
}

fn om_sample(line: &[u8]) -> Result<Sample<'_>, Fail> {
    let name_end = scan_ident(line, 1, true);
    let name = &line[..name_end];
    let mut labels = RawLabels::default();
    let mut i = name_end;
    if line.get(i) == Some(&b'{') {
        let close;
        (close, labels) = om_labels(line, i + 1)?;
        i = close + 1;
    }
    let series = &line[..i];
    let (value, mut i) = om_value(line, i, "value after metric")?;
    let mut timestamp_ms = None;
    let mut exemplar = None;
    if i < line.len() {
        // line[i] == b' '
        if !line[i + 1..].starts_with(b"# {") {
            let (ts_start, ts_end) = om_token(line, i + 1);
            if ts_end == ts_start {
                return Err(Fail::Expected("timestamp or exemplar", ts_start));
            }
            timestamp_ms = Some(om_timestamp(&line[ts_start..ts_end], "timestamp")?);
            i = ts_end;
            if i < line.len() && !line[i + 1..].starts_with(b"# {") {
                return Err(Fail::Expected("end of line or exemplar after timestamp", i));
            }
        }
        if i < line.len() {
            exemplar = Some(om_exemplar(line, name, i + 4)?);
        }
    }
    Ok(Sample {
        series,
        // SAFETY: metric names are ASCII.
        name: unsafe { assume_utf8(name) },
        value,
        timestamp_ms,
        exemplar,
        labels,
    })
}

/// Parses ` {labels} value [timestamp]` of an exemplar; `start` is just after `{`.
fn om_exemplar<'a>(line: &'a [u8], name: &[u8], start: usize) -> Result<Exemplar<'a>, Fail> {
    if !name.ends_with(b"_total") && !name.ends_with(b"_bucket") {
        let name = String::from_utf8_lossy(name);
        return Err(Fail::Msg(
            format!("metric name {name} does not support exemplars").into(),
        ));
    }
    let (close, labels) = om_labels(line, start)?;
    let (value, i) = om_value(line, close + 1, "value after exemplar labels")?;
    let mut timestamp_ms = None;
    if i < line.len() {
        let (ts_start, ts_end) = om_token(line, i + 1);
        if ts_end == ts_start {
            return Err(Fail::Expected("exemplar timestamp", ts_start));
        }
        timestamp_ms = Some(om_timestamp(&line[ts_start..ts_end], "exemplar timestamp")?);
        if ts_end < line.len() {
            return Err(Fail::Expected("end of line after exemplar timestamp", ts_end));
        }
    }
    Ok(Exemplar {
        value,
        timestamp_ms,
        labels,
    })
}

/// Parses ` value` at `i` (which must be a single space); returns the value and
/// the index after it.
#[inline]
fn om_value(line: &[u8], i: usize, what: &'static str) -> Result<(f64, usize), Fail> {
    if line.get(i) != Some(&b' ') {
        return Err(Fail::Expected(what, i));
    }
    let (start, end) = om_token(line, i + 1);
    if end == start {
        return Err(Fail::Expected(what, start));
    }
    let token = &line[start..end];
    let value = parse_value(token).map_err(|e| e.fail(token))?;
    Ok((value, end))
}

/// The run of non-space bytes starting at `start`.
#[inline]
fn om_token(line: &[u8], start: usize) -> (usize, usize) {
    let rest = line.get(start..).unwrap_or_default();
    let len = memchr(b' ', rest).unwrap_or(rest.len());
    (start, start + len)
}

/// OpenMetrics timestamps are float seconds; converted to integer milliseconds.
fn om_timestamp(token: &[u8], what: &str) -> Result<i64, Fail> {
    let seconds = parse_value(token).map_err(|e| e.fail(token))?;
    if !seconds.is_finite() {
        let token = String::from_utf8_lossy(token);
        return Err(Fail::Msg(format!("invalid {what} {token}").into()));
    }
    let ms = seconds * 1000.0;
    // i64::MIN is exactly representable; i64::MAX rounds up to 2^63.
    if !(-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&ms) {
        let token = String::from_utf8_lossy(token);
        return Err(Fail::Msg(format!("{what} out of range: {token}").into()));
    }
    Ok(ms as i64)
}

/// Validates an OpenMetrics label section starting just after `{`; returns the
/// index of the closing `}`. No whitespace, commas only between pairs.
#[inline(always)]
fn om_labels(line: &[u8], start: usize) -> Result<(usize, RawLabels<'_>), Fail> {
    let mut dups = DupCheck::default();
    let mut escaped = false;
    let mut i = start;
    if line.get(i) != Some(&b'}') {
        loop {
            if !line.get(i).is_some_and(|&b| has(b, C_LABEL_START)) {
                let what = if i == start { "label name or '}'" } else { "label name" };
                return Err(Fail::Expected(what, i));
            }
            let name_start = i;
            i = scan_ident(line, i + 1, false);
            dups.add(&line[start..name_start], &line[name_start..i])?;
            if line.get(i..i + 2) != Some(b"=\"") {
                return Err(if line.get(i) == Some(&b'=') {
                    Fail::Expected("label value", i + 1)
                } else {
                    Fail::Expected("'='", i)
                });
            }
            i = quoted_value_end(line, i + 2, &mut escaped)?;
            match line.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => break,
                _ => return Err(Fail::Expected("',' or '}'", i)),
            }
        }
    }
    let labels = RawLabels {
        bytes: &line[start..i],
        count: dups.count,
        simple: !escaped,
    };
    Ok((i, labels))
}

// ---------------------------------------------------------------------------
// Shared pieces

/// Builds a HELP/TYPE/UNIT entry from its already split parts.
fn meta_entry<'a>(keyword: &str, metric: &'a str, text: &'a [u8], format: Format) -> Result<Entry<'a>, Fail> {
    match keyword {
        "TYPE" => match MetricType::parse(text, format) {
            Some(kind) => Ok(Entry::Type { metric, kind }),
            None => {
                let text = String::from_utf8_lossy(text);
                Err(Fail::Msg(format!("invalid metric type {text:?}").into()))
            }
        },
        "HELP" => {
            let text = to_str(text).ok_or_else(|| fail_msg("help text is not valid UTF-8"))?;
            Ok(Entry::Help {
                metric,
                text: unescape(text, format == Format::OpenMetrics),
            })
        }
        _ => {
            let unit = to_str(text).ok_or_else(|| fail_msg("unit is not valid UTF-8"))?;
            let suffix_ok = unit.is_empty() || metric.strip_suffix(unit).is_some_and(|head| head.ends_with('_'));
            if !suffix_ok {
                return Err(Fail::Msg(
                    format!("unit {unit:?} not a suffix of metric {metric:?}").into(),
                ));
            }
            Ok(Entry::Unit { metric, unit })
        }
    }
}

/// Positions of the `"` bytes in `hay[base..base + 64]` as a bit mask, bit
/// `n` for byte `base + n` (fewer bits at the end of `hay`).
#[inline(always)]
fn quote_mask(hay: &[u8], base: usize) -> u64 {
    let mut mask = 0;
    let end = hay.len().min(base + 64);
    let mut i = base;
    #[cfg(target_arch = "x86_64")]
    while i < end {
        // The chunk at `i`, or the last 16 bytes of `hay` with the bytes
        // before `i` shifted out.
        let (chunk, skip) = match hay[i..].first_chunk::<16>() {
            Some(chunk) => (chunk, 0),
            None => match hay.last_chunk::<16>() {
                Some(tail) => (tail, i - (hay.len() - 16)),
                None => break,
            },
        };
        mask |= u64::from(simd::quotes(chunk) >> skip) << (i - base);
        i += 16;
    }
    // Inputs shorter than a chunk, and other architectures.
    while i < end {
        mask |= u64::from(hay[i] == b'"') << (i - base);
        i += 1;
    }
    mask
}

/// Scans a quoted label value whose opening quote is just before `start`;
/// returns the index after the closing quote. `\` escapes the next byte
/// (and sets `escaped`).
/// UTF-8 is validated only if a non-ASCII byte was seen.
#[inline(always)]
fn quoted_value_end(line: &[u8], start: usize, escaped: &mut bool) -> Result<usize, Fail> {
    let mut non_ascii = false;
    let mut i = start;
    loop {
        i = find_quote(line, i, &mut non_ascii);
        match line.get(i) {
            Some(b'"') => break,
            Some(_) if i + 1 < line.len() => {
                *escaped = true;
                non_ascii |= !line[i + 1].is_ascii();
                i += 2;
            }
            _ => return Err(fail_msg("unterminated label value")),
        }
    }
    if non_ascii && std::str::from_utf8(&line[start..i]).is_err() {
        return Err(fail_msg("invalid UTF-8 in label value"));
    }
    Ok(i + 1)
}

/// Splits the next `name="value"` pair off a validated label section; returns
/// the name, the raw (still escaped) value and whether it contains a `\`.
#[inline]
fn next_raw_label<'a>(rest: &mut &'a [u8]) -> Option<(&'a [u8], &'a [u8], bool)> {
    let bytes = *rest;
    let mut i = 0;
    while i < bytes.len() && matches!(bytes[i], b',' | b' ' | b'\t') {
        i += 1;
    }
    if i >= bytes.len() {
        *rest = &[];
        return None;
    }
    let name_start = i;
    i = scan_ident(bytes, i, false);
    let name = &bytes[name_start..i];
    if bytes.get(i..i + 2) == Some(b"=\"") {
        i += 2;
    } else {
        // Text format: optional whitespace around `=`.
        while i < bytes.len() && bytes[i] != b'"' {
            i += 1;
        }
        i += 1;
    }
    let value_start = i;
    let mut escaped = false;
    let mut non_ascii = false;
    loop {
        i = find_quote(bytes, i, &mut non_ascii);
        match bytes.get(i) {
            Some(b'"') => break,
            Some(_) => {
                escaped = true;
                i += 2;
            }
            None => {
                *rest = &[];
                return None;
            }
        }
    }
    *rest = &bytes[i + 1..];
    Some((name, &bytes[value_start..i], escaped))
}

/// Rejects a label name seen earlier in the same label section. Free while
/// names arrive sorted (what client libraries emit); otherwise rescans the
/// already validated prefix of the section.
#[derive(Default)]
struct DupCheck<'a> {
    last: &'a [u8],
    unsorted: bool,
    count: u32,
}

impl<'a> DupCheck<'a> {
    #[inline(always)]
    fn add(&mut self, prefix: &'a [u8], name: &'a [u8]) -> Result<(), Fail> {
        if self.count > 0 && (self.unsorted || !sorts_after(name, self.last)) {
            self.unsorted = true;
            check_unseen(prefix, name)?;
        }
        self.last = name;
        self.count = self.count.saturating_add(1);
        Ok(())
    }
}

/// Rejects `name` if the validated label section `prefix` already has it.
#[inline(never)]
fn check_unseen(prefix: &[u8], name: &[u8]) -> Result<(), Fail> {
    let mut rest = prefix;
    while let Some((seen, _, _)) = next_raw_label(&mut rest) {
        if seen == name {
            let name = String::from_utf8_lossy(name);
            return Err(Fail::Msg(format!("duplicate label name {name:?}").into()));
        }
    }
    Ok(())
}

/// `a > b`, usually decided by comparing 8-byte (or 1-byte) prefixes
/// without a `memcmp` call.
#[inline(always)]
fn sorts_after(a: &[u8], b: &[u8]) -> bool {
    if let (Some(x), Some(y)) = (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        let (x, y) = (u64::from_be_bytes(*x), u64::from_be_bytes(*y));
        if x != y {
            return x > y;
        }
    } else if let (Some(x), Some(y)) = (a.first(), b.first()) {
        if x != y {
            return x > y;
        }
    }
    a > b
}

/// Undoes `\\`, `\n` and (if `quote`) `\"`; other escapes are kept verbatim,
/// as Prometheus does.
fn unescape(s: &str, quote: bool) -> Cow<'_, str> {
    let bytes = s.as_bytes();
    let Some(first) = memchr(b'\\', bytes) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len());
    let mut chunk_start = 0;
    let mut i = first;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        let replacement = match bytes.get(i + 1) {
            Some(b'\\') => '\\',
            Some(b'n') => '\n',
            Some(b'"') if quote => '"',
            _ => {
                i += 1;
                continue;
            }
        };
        // `i` and `i + 2` are char boundaries: both escape bytes are ASCII.
        out.push_str(&s[chunk_start..i]);
        out.push(replacement);
        i += 2;
        chunk_start = i;
    }
    out.push_str(&s[chunk_start..]);
    Cow::Owned(out)
}

/// The offending line for an error message: lossy, control characters
/// escaped, at most [`CONTEXT_CHARS`] characters.
fn context(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == CONTEXT_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Numbers

/// Why a value token was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueError {
    Syntax,
    Unsupported,
    Range,
}

impl ValueError {
    #[cold]
    fn fail(self, token: &[u8]) -> Fail {
        // A hostile page can make the token megabytes long: the message quotes its start.
        const SHOWN: usize = 64;
        let token = match token.get(..SHOWN) {
            Some(start) if token.len() > SHOWN => format!("{}…", String::from_utf8_lossy(start)),
            _ => String::from_utf8_lossy(token).into_owned(),
        };
        let msg = match self {
            ValueError::Syntax => format!("invalid float {token:?}"),
            ValueError::Unsupported => format!("unsupported character in float {token:?}"),
            ValueError::Range => format!("float out of range {token:?}"),
        };
        Fail::Msg(msg.into())
    }
}

/// Exact powers of ten representable in an f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// Parses a sample value with Go `strconv.ParseFloat` acceptance (minus hex
/// and underscores, which Prometheus rejects). Decimals whose mantissa fits
/// 2^53 with a power-of-ten exponent up to 22 are computed directly, which is
/// exact (one IEEE rounding); everything else goes through `f64::from_str`.
#[inline]
fn parse_value(token: &[u8]) -> Result<f64, ValueError> {
    let len = token.len();
    let mut i = 0;
    let negative = match token.first() {
        Some(b'-') => {
            i = 1;
            true
        }
        Some(b'+') => {
            i = 1;
            false
        }
        _ => false,
    };
    let mut mantissa: u64 = 0;
    let int_start = i;
    while i < len {
        let d = token[i].wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(d));
        i += 1;
    }
    let mut digits = i - int_start;
    let mut frac_digits = 0;
    if i < len && token[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < len {
            let d = token[i].wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(d));
            i += 1;
        }
        frac_digits = i - frac_start;
        digits += frac_digits;
    }
    if digits == 0 {
        return parse_value_slow(token);
    }
    let mut exp: i32 = 0;
    if i < len && token[i] | 0x20 == b'e' {
        i += 1;
        let exp_negative = match token.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let exp_start = i;
        while i < len {
            let d = token[i].wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            // Saturate: anything this large is out of range either way.
            exp = (exp * 10 + i32::from(d)).min(100_000);
            i += 1;
        }
        if i == exp_start {
            return parse_value_slow(token);
        }
        if exp_negative {
            exp = -exp;
        }
    }
    if i != len {
        return parse_value_slow(token);
    }
    // The token is a valid decimal here. Mantissas of up to 19 digits fit
    // the u64; the exact path also needs it below 2^53.
    let exp10 = exp - frac_digits.min(100_000) as i32;
    if digits > 19 || mantissa > 1 << 53 || !(-22..=22).contains(&exp10) {
        return parse_decimal_std(token);
    }
    let m = mantissa as f64;
    let value = if exp10 >= 0 {
        m * POW10[exp10 as usize]
    } else {
        m / POW10[(-exp10) as usize]
    };
    Ok(if negative { -value } else { value })
}

/// A token already known to match the decimal grammar, via the standard
/// library (correctly rounded, like Go).
#[inline(never)]
fn parse_decimal_std(token: &[u8]) -> Result<f64, ValueError> {
    // SAFETY: the caller checked that the token is ASCII digits, sign, `.`, `e`.
    let text = unsafe { assume_utf8(token) };
    match text.parse::<f64>() {
        Ok(v) if v.is_infinite() => Err(ValueError::Range),
        Ok(v) => Ok(v),
        Err(_) => Err(ValueError::Syntax),
    }
}

#[cold]
#[inline(never)]
fn parse_value_slow(token: &[u8]) -> Result<f64, ValueError> {
    if let Some(value) = parse_special(token) {
        return Ok(value);
    }
    if token.iter().any(|b| matches!(b, b'_' | b'p' | b'P')) {
        return Err(ValueError::Unsupported);
    }
    // With only these bytes Rust's float grammar is the same as Go's decimal one.
    if !token
        .iter()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return Err(ValueError::Syntax);
    }
    let text = std::str::from_utf8(token).map_err(|_| ValueError::Syntax)?;
    match text.parse::<f64>() {
        Ok(v) if v.is_infinite() => Err(ValueError::Range),
        Ok(v) => Ok(v),
        Err(_) => Err(ValueError::Syntax),
    }
}

/// Go's special values: `[+-]inf`, `[+-]infinity`, `nan`, any case.
fn parse_special(token: &[u8]) -> Option<f64> {
    let (negative, signed, rest) = match token.first() {
        Some(b'-') => (true, true, &token[1..]),
        Some(b'+') => (false, true, &token[1..]),
        _ => (false, false, token),
    };
    if rest.eq_ignore_ascii_case(b"inf") || rest.eq_ignore_ascii_case(b"infinity") {
        return Some(if negative { f64::NEG_INFINITY } else { f64::INFINITY });
    }
    if !signed && rest.eq_ignore_ascii_case(b"nan") {
        return Some(f64::from_bits(NORMAL_NAN_BITS));
    }
    None
}

/// Text-format timestamps: decimal digits (already checked), milliseconds.
fn parse_int_timestamp(digits: &[u8]) -> Result<i64, Fail> {
    let mut ts: i64 = 0;
    for &d in digits {
        ts = ts
            .checked_mul(10)
            .and_then(|t| t.checked_add(i64::from(d - b'0')))
            .ok_or_else(|| fail_msg("timestamp out of range"))?;
    }
    Ok(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Labels = Vec<(String, String)>;

    fn entries(body: &str, format: Format) -> Vec<Entry<'_>> {
        Parser::new(body.as_bytes(), format)
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    fn samples(body: &str, format: Format) -> Vec<Sample<'_>> {
        entries(body, format)
            .into_iter()
            .filter_map(|e| match e {
                Entry::Sample(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn labels(s: &Sample<'_>) -> Labels {
        s.labels().map(|(n, v)| (n.to_owned(), v.into_owned())).collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Labels {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn error(body: &[u8], format: Format) -> ParseError {
        for entry in Parser::new(body, format) {
            if let Err(e) = entry {
                return e;
            }
        }
        panic!("no error for {:?}", String::from_utf8_lossy(body));
    }

    #[test]
    fn content_type_selects_format() {
        let om = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        assert_eq!(Format::from_content_type(om), Format::OpenMetrics);
        assert_eq!(
            Format::from_content_type(" Application/OpenMetrics-Text "),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_content_type("text/plain; version=0.0.4"), Format::Text);
        assert_eq!(Format::from_content_type(""), Format::Text);
        assert_eq!(Format::from_content_type("application/openmetrics-textx"), Format::Text);
    }

    #[test]
    fn text_metadata_comments_and_samples() {
        let body = "# HELP rpc_seconds RPC latency.\n\
                    # TYPE rpc_seconds summary\n\
                    # a free comment\n\
                    #no space comment\n\
                    #\n\
                    \n   \n\
                    # HELPER is not HELP\n\
                    rpc_seconds{quantile=\"0.5\"} 4.9351e-05\n\
                    rpc_seconds_sum 1.5\n\
                    rpc_seconds_count 99\n\
                    # TYPE lat histogram\n\
                    lat_bucket{le=\"0.1\"} 3\n\
                    lat_bucket{le=\"+Inf\"} 5\n\
                    # HELP empty\n\
                    # TYPE u untyped\n";
        let got = entries(body, Format::Text);
        assert_eq!(got.len(), 10);
        assert_eq!(
            got[0],
            Entry::Help {
                metric: "rpc_seconds",
                text: Cow::Borrowed("RPC latency.")
            }
        );
        assert_eq!(
            got[1],
            Entry::Type {
                metric: "rpc_seconds",
                kind: MetricType::Summary
            }
        );
        let Entry::Sample(s) = &got[2] else { panic!() };
        assert_eq!(s.name, "rpc_seconds");
        assert_eq!(s.series, b"rpc_seconds{quantile=\"0.5\"}");
        assert_eq!(s.value, 4.9351e-05);
        assert_eq!(labels(s), pairs(&[("quantile", "0.5")]));
        let Entry::Sample(s) = &got[4] else { panic!() };
        assert_eq!((s.name, s.value, s.label_count()), ("rpc_seconds_count", 99.0, 0));
        assert_eq!(
            got[5],
            Entry::Type {
                metric: "lat",
                kind: MetricType::Histogram
            }
        );
        let Entry::Sample(s) = &got[7] else { panic!() };
        assert_eq!(labels(s), pairs(&[("le", "+Inf")]));
        assert_eq!(
            got[8],
            Entry::Help {
                metric: "empty",
                text: Cow::Borrowed("")
            }
        );
        assert_eq!(
            got[9],
            Entry::Type {
                metric: "u",
                kind: MetricType::Unknown
            }
        );
    }

    #[test]
    fn text_whitespace_commas_and_timestamps() {
        let body = "a{x=\"1\",} 1\n\
                    a{ x=\"1\", y=\"2\" } 2\n\
                    a { x = \"1\" , y= \"2\", } 3\n\
                    \t a{x=\"1\" y=\"2\"}\t4  \t 1700000000000 \n\
                    some:rate5m{a_b=\"c\"}\t5\n\
                    _under{_l=\"v\"} 6\n\
                    empty{} 7\n\
                    last 8 123";
        let got = samples(body, Format::Text);
        assert_eq!(got.len(), 8);
        let xy = pairs(&[("x", "1"), ("y", "2")]);
        assert_eq!(labels(&got[0]), pairs(&[("x", "1")]));
        assert_eq!(labels(&got[1]), xy);
        assert_eq!(labels(&got[2]), xy);
        assert_eq!(got[2].series, b"a { x = \"1\" , y= \"2\", }");
        assert_eq!(labels(&got[3]), xy);
        assert_eq!(got[3].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(got[3].label_count(), 2);
        assert_eq!(got[4].name, "some:rate5m");
        assert_eq!(labels(&got[5]), pairs(&[("_l", "v")]));
        assert_eq!((got[6].label_count(), got[6].series), (0, &b"empty{}"[..]));
        assert_eq!((got[7].value, got[7].timestamp_ms), (8.0, Some(123)));
        assert_eq!(got[0].timestamp_ms, None);
        assert!(got.iter().all(|s| s.exemplar.is_none()));
    }

    #[test]
    fn label_value_escapes() {
        let body = r#"m{a="plain",b="q\"uote",c="back\\slash",d="new\nline",e="keep\t",f="\\n"} 1"#;
        let got = samples(body, Format::Text);
        let values: Vec<_> = got[0].labels().map(|(_, v)| v).collect();
        assert!(matches!(values[0], Cow::Borrowed("plain")));
        assert_eq!(values[1], "q\"uote");
        assert_eq!(values[2], "back\\slash");
        assert_eq!(values[3], "new\nline");
        assert_eq!(values[4], "keep\\t");
        assert_eq!(values[5], "\\n");
        assert!(values[1..].iter().all(|v| matches!(v, Cow::Owned(_))));
        let om = "m{a=\"x\\\"y\"} 1\n# EOF\n";
        assert_eq!(labels(&samples(om, Format::OpenMetrics)[0]), pairs(&[("a", "x\"y")]));
    }

    #[test]
    fn help_escapes_depend_on_format() {
        let text = entries("# HELP m a\\\\b\\nc\\\"d\n", Format::Text);
        assert_eq!(
            text[0],
            Entry::Help {
                metric: "m",
                text: Cow::Owned("a\\b\nc\\\"d".into())
            }
        );
        let om = entries("# HELP m a\\\\b\\nc\\\"d\n# EOF\n", Format::OpenMetrics);
        assert_eq!(
            om[0],
            Entry::Help {
                metric: "m",
                text: Cow::Owned("a\\b\nc\"d".into())
            }
        );
    }

    #[test]
    fn special_and_edge_values() {
        let cases: &[(&str, f64)] = &[
            ("+Inf", f64::INFINITY),
            ("-Inf", f64::NEG_INFINITY),
            ("inf", f64::INFINITY),
            ("Infinity", f64::INFINITY),
            ("-INFINITY", f64::NEG_INFINITY),
            ("0", 0.0),
            ("-0", -0.0),
            ("12345", 12345.0),
            ("1.5", 1.5),
            (".5", 0.5),
            ("5.", 5.0),
            ("1e3", 1000.0),
            ("1.e3", 1000.0),
            ("1E+3", 1000.0),
            ("-2.5e-3", -0.0025),
            ("1e-400", 0.0),
            ("1.7976931348623157e308", f64::MAX),
            ("123456789012345678901234567890", 1.2345678901234568e29),
            ("0.1", 0.1),
        ];
        for (token, want) in cases {
            let body = format!("m {token}\n");
            let got = samples(&body, Format::Text)[0].value;
            assert_eq!(got.to_bits(), want.to_bits(), "{token}");
        }
        for token in ["NaN", "nan", "NAN"] {
            let body = format!("m {token}\n");
            assert_eq!(samples(&body, Format::Text)[0].value.to_bits(), NORMAL_NAN_BITS);
        }
        for (token, msg) in [
            ("+NaN", "invalid float"),
            ("infin", "invalid float"),
            ("true", "invalid float"),
            ("1e", "invalid float"),
            (".", "invalid float"),
            ("--1", "invalid float"),
            ("1_000", "unsupported character"),
            ("0x1p-3", "unsupported character"),
            ("0x10", "invalid float"),
            ("1e400", "out of range"),
            ("-1e400", "out of range"),
        ] {
            let e = error(format!("m {token}\n").as_bytes(), Format::Text);
            assert!(e.message.contains(msg), "{token}: {e}");
        }
    }

    #[test]
    fn fast_value_path_matches_std() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut s = String::new();
            if rng.below(4) == 0 {
                s.push('-');
            }
            for _ in 0..rng.below(12) {
                s.push((b'0' + rng.below(10) as u8) as char);
            }
            if rng.below(2) == 0 {
                s.push('.');
                for _ in 0..rng.below(10) {
                    s.push((b'0' + rng.below(10) as u8) as char);
                }
            }
            if rng.below(3) == 0 {
                s.push('e');
                s.push_str(&(rng.below(60) as i32 - 30).to_string());
            }
            let ours = parse_value(s.as_bytes());
            match s.parse::<f64>() {
                Ok(v) => assert_eq!(ours.map(f64::to_bits), Ok(v.to_bits()), "{s}"),
                Err(_) => assert!(ours.is_err(), "{s}"),
            }
        }
    }

    #[test]
    fn text_timestamps() {
        assert_eq!(samples("m 1 0\n", Format::Text)[0].timestamp_ms, Some(0));
        let max = format!("m 1 {}\n", i64::MAX);
        assert_eq!(samples(&max, Format::Text)[0].timestamp_ms, Some(i64::MAX));
        assert!(error(b"m 1 9223372036854775808\n", Format::Text)
            .message
            .contains("timestamp out of range"));
        let e = error(b"m 1 -5\n", Format::Text);
        assert_eq!(e.message, "expected timestamp or end of line, got '-'");
        let e = error(b"m 1 1.5\n", Format::Text);
        assert_eq!(e.message, "expected end of line after timestamp, got '.'");
        let e = error(b"foo 0 1_2\n", Format::Text);
        assert_eq!(e.message, "expected end of line after timestamp, got '_'");
    }

    #[test]
    fn text_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"a\n", "expected value after metric, got end of line"),
            (b"a", "expected value after metric, got end of input"),
            (b"a{b='c'} 1\n", "expected label value, got '\\''"),
            (b"a{b=\n", "expected label value, got end of line"),
            (b"a{\xff=\"foo\"} 1\n", "expected label name, got '\\xff'"),
            (b"a{b=\"\xff\"} 1\n", "invalid UTF-8 in label value"),
            (b"a{b=\"c} 1\n", "unterminated label value"),
            (b"a{b=\"c\\", "unterminated label value"),
            (b"a{b=\"c\"", "expected label name, got end of input"),
            (b"a{b} 1\n", "expected '=', got '}'"),
            (b"a{=\"\"} 0\n", "expected label name, got '='"),
            (b"a{,} 0\n", "expected label name, got ','"),
            (b"a{b=\"1\",,c=\"2\"} 0\n", "expected label name, got ','"),
            (b"a{0=\"1\"} 0\n", "expected label name, got '0'"),
            (b"{a=\"ok\"} 1\n", "expected a metric name or comment, got '{'"),
            (b"9 1\n", "expected a metric name or comment, got '9'"),
            (b"a{b=\"1\"}{c=\"2\"} 1\n", "expected value after metric, got '{'"),
            (b"a 1{\n", "expected timestamp or end of line, got '{'"),
            (b"a 1\r\n", "invalid float \"1\\r\""),
            (b"# TYPE #\n", "expected metric name after TYPE, got '#'"),
            (b"# HELP 1a x\n", "expected metric name after HELP, got '1'"),
            (b"# TYPE m counter \n", "invalid metric type \"counter \""),
            (b"# TYPE m info\n", "invalid metric type \"info\""),
            (b"# TYPE m\n", "invalid metric type \"\""),
            (b"# HELP m \xff\n", "help text is not valid UTF-8"),
            (b"a{b=\"1\",b=\"2\"} 1\n", "duplicate label name \"b\""),
            (b"\x00\n", "expected a metric name or comment, got '\\x00'"),
        ];
        for (input, want) in cases {
            let e = error(input, Format::Text);
            assert_eq!(e.message, *want, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn text_type_keywords() {
        let body = "# TYPE a counter\n# TYPE b gauge\n# TYPE c histogram\n# TYPE d summary\n# TYPE e untyped\n# \tTYPE f\tgauge\n";
        let kinds: Vec<_> = entries(body, Format::Text)
            .into_iter()
            .map(|e| match e {
                Entry::Type { kind, .. } => kind,
                other => panic!("{other:?}"),
            })
            .collect();
        use MetricType::*;
        assert_eq!(kinds, [Counter, Gauge, Histogram, Summary, Unknown, Gauge]);
    }

    #[test]
    fn duplicate_label_names() {
        for body in [
            "m{a=\"1\",a=\"2\"} 1\n",
            "m{b=\"1\",a=\"2\",b=\"3\"} 1\n",
            "m{a=\"1\", c=\"2\", b=\"3\", a=\"4\"} 1\n",
        ] {
            let e = error(body.as_bytes(), Format::Text);
            assert!(e.message.starts_with("duplicate label name"), "{body}: {e}");
        }
        let e = error(b"m{z=\"1\",y=\"2\",z=\"3\"} 1\n# EOF\n", Format::OpenMetrics);
        assert_eq!(e.message, "duplicate label name \"z\"");
        let e = error(b"m_total 1 # {a=\"1\",a=\"1\"} 1\n# EOF\n", Format::OpenMetrics);
        assert_eq!(e.message, "duplicate label name \"a\"");
        // Unsorted but unique is fine; so are names that are prefixes of others.
        let got = samples("m{b=\"1\",a=\"2\",ab=\"3\",c=\"4\",aa=\"5\"} 1\n", Format::Text);
        assert_eq!(got[0].label_count(), 5);
        assert_eq!(got[0].labels().count(), 5);
    }

    #[test]
    fn utf8_label_values_and_help() {
        let body = "# HELP m Grüße\nm{city=\"Zürich\",emoji=\"🦀\"} 1\n";
        let got = entries(body, Format::Text);
        assert_eq!(
            got[0],
            Entry::Help {
                metric: "m",
                text: Cow::Borrowed("Grüße")
            }
        );
        let Entry::Sample(s) = &got[1] else { panic!() };
        let values: Vec<_> = s.labels().map(|(_, v)| v).collect();
        assert!(matches!(values[0], Cow::Borrowed("Zürich")));
        assert_eq!(values[1], "🦀");
        let e = error(b"m{a=\"ok\",b=\"\xc3\x28\"} 1\n# EOF\n", Format::OpenMetrics);
        assert_eq!(e.message, "invalid UTF-8 in label value");
        // Bytes other than `"`, `\` and newline are allowed, NUL included.
        let got = samples("m{a=\"x\0y\"} 1\n", Format::Text);
        assert_eq!(labels(&got[0]), pairs(&[("a", "x\0y")]));
    }

    const OM_BODY: &str = "# TYPE foo counter\n\
        # HELP foo Total foos.\n\
        # UNIT foo_seconds seconds\n\
        foo_total 17.0 1520879607.789 # {id=\"counter-test\"} 5\n\
        foo_total{a=\"b\"} 18 # {id=\"x\",b=\"y\"} 6 1520879607.5\n\
        foo_created 1520872607.123\n\
        # TYPE hh histogram\n\
        hh_bucket{le=\"0.1\"} 2 # {} 0.05\n\
        hh_bucket{le=\"+Inf\"} 3\n\
        hh_count 3\n\
        hh_sum 0.3\n\
        # TYPE gh gaugehistogram\n\
        # TYPE i info\n\
        i_info{version=\"1.0\"} 1\n\
        # TYPE ss stateset\n\
        ss{ss=\"a\"} 1\n\
        # TYPE s summary\n\
        # TYPE g gauge\n\
        # TYPE u unknown\n\
        # UNIT u \n\
        u -1.5e3 -2\n\
        # EOF\n";

    #[test]
    fn openmetrics_full_body() {
        let got = entries(OM_BODY, Format::OpenMetrics);
        assert_eq!(
            got[2],
            Entry::Unit {
                metric: "foo_seconds",
                unit: "seconds"
            }
        );
        let samples: Vec<_> = got
            .iter()
            .filter_map(|e| match e {
                Entry::Sample(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(samples.len(), 10);
        let s = samples[0];
        assert_eq!(
            (s.name, s.value, s.timestamp_ms),
            ("foo_total", 17.0, Some(1_520_879_607_789))
        );
        let ex = s.exemplar.unwrap();
        assert_eq!((ex.value, ex.timestamp_ms, ex.label_count()), (5.0, None, 1));
        let ex_labels: Labels = ex.labels().map(|(n, v)| (n.into(), v.into())).collect();
        assert_eq!(ex_labels, pairs(&[("id", "counter-test")]));
        let s = samples[1];
        assert_eq!(s.series, b"foo_total{a=\"b\"}");
        assert_eq!(labels(s), pairs(&[("a", "b")]));
        let ex = s.exemplar.unwrap();
        assert_eq!(
            (ex.value, ex.timestamp_ms, ex.labels().count()),
            (6.0, Some(1_520_879_607_500), 2)
        );
        assert_eq!((samples[2].value, samples[2].timestamp_ms), (1_520_872_607.123, None));
        let ex = samples[3].exemplar.unwrap();
        assert_eq!((ex.value, ex.label_count()), (0.05, 0));
        let last = samples[9];
        assert_eq!((last.value, last.timestamp_ms), (-1500.0, Some(-2000)));
        let kinds: Vec<_> = got
            .iter()
            .filter_map(|e| match e {
                Entry::Type { kind, .. } => Some(*kind),
                _ => None,
            })
            .collect();
        use MetricType::*;
        assert_eq!(
            kinds,
            [
                Counter,
                Histogram,
                GaugeHistogram,
                Info,
                StateSet,
                Summary,
                Gauge,
                Unknown
            ]
        );
        // Without the trailing newline after `# EOF` as well.
        let trimmed = OM_BODY.trim_end_matches('\n');
        assert_eq!(entries(trimmed, Format::OpenMetrics), got);
    }

    #[test]
    fn openmetrics_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "data does not end with # EOF"),
            (b"metric 1", "data does not end with # EOF"),
            (b"metric 1\n", "data does not end with # EOF"),
            (b"m_total 1 # {a=\"b\"} 4", "data does not end with # EOF"),
            (b"\n", "expected a metric name or '# ', got end of line"),
            (b"\n\n# EOF\n", "expected a metric name or '# ', got end of line"),
            (b" a 1\n# EOF\n", "expected a metric name or '# ', got ' '"),
            (b"9\n# EOF\n", "expected a metric name or '# ', got '9'"),
            (b"a\n# EOF\n", "expected value after metric, got end of line"),
            (b"a\t1\n# EOF\n", "expected value after metric, got '\\t'"),
            (b"a  1\n# EOF\n", "expected value after metric, got ' '"),
            (b"a 1\t2\n# EOF\n", "invalid float \"1\\t2\""),
            (
                b"a 1 2 \n# EOF\n",
                "expected end of line or exemplar after timestamp, got ' '",
            ),
            (
                b"a 1 2 #\n# EOF\n",
                "expected end of line or exemplar after timestamp, got ' '",
            ),
            (b"a 1 \n# EOF\n", "expected timestamp or exemplar, got end of line"),
            (b"a 1 1z\n# EOF\n", "invalid float \"1z\""),
            (
                b"a 1 1 1\n# EOF\n",
                "expected end of line or exemplar after timestamp, got ' '",
            ),
            (b"a 1 NaN\n# EOF\n", "invalid timestamp NaN"),
            (b"a 1 -Inf\n# EOF\n", "invalid timestamp -Inf"),
            (b"a 1 1e300\n# EOF\n", "timestamp out of range: 1e300"),
            (b"# TYPE u untyped\n# EOF\n", "invalid metric type \"untyped\""),
            (b"# TYPE c counter \n# EOF\n", "invalid metric type \"counter \""),
            (b"# TYPE c  counter\n# EOF\n", "invalid metric type \" counter\""),
            (
                b"#  TYPE c counter\n# EOF\n",
                "expected HELP, TYPE, UNIT or EOF after '# '",
            ),
            (b"#\tTYPE c counter\n# EOF\n", "expected ' ' after '#', got '\\t'"),
            (b"# a comment\n# EOF\n", "expected HELP, TYPE, UNIT or EOF after '# '"),
            (b"#EOF\n", "expected ' ' after '#', got 'E'"),
            (b"# TYPE \n# EOF\n", "expected metric name after TYPE, got end of line"),
            (b"# TYPE m\n# EOF\n", "expected text in TYPE"),
            (b"# HELP m\n# EOF\n", "expected text in HELP"),
            (b"# UNIT m\n# EOF\n", "expected text in UNIT"),
            (
                b"# UNIT metric suffix\n# EOF\n",
                "unit \"suffix\" not a suffix of metric \"metric\"",
            ),
            (
                b"# UNIT metricsuffix suffix\n# EOF\n",
                "unit \"suffix\" not a suffix of metric \"metricsuffix\"",
            ),
            (
                b"# UNIT m suffix\n# EOF\n",
                "unit \"suffix\" not a suffix of metric \"m\"",
            ),
            (b"# EOF\na 1\n", "unexpected data after # EOF"),
            (b"# EOF\n\n", "unexpected data after # EOF"),
            (b"# EOFa 1\n", "unexpected data after # EOF"),
            (b"a{b='c'} 1\n# EOF\n", "expected label value, got '\\''"),
            (b"a{b=\"c\",} 1\n# EOF\n", "expected label name, got '}'"),
            (b"a{,b=\"c\"} 1\n# EOF\n", "expected label name or '}', got ','"),
            (b"a{b=\"c\"d=\"e\"} 1\n# EOF\n", "expected ',' or '}', got 'd'"),
            (b"a{b=\"c\",,d=\"e\"} 1\n# EOF\n", "expected label name, got ','"),
            (b"a{b =\"c\"} 1\n# EOF\n", "expected '=', got ' '"),
            (b"a{ b=\"c\"} 1\n# EOF\n", "expected label name or '}', got ' '"),
            (b"a{b=\n# EOF\n", "expected label value, got end of line"),
            (b"a{b=\"c\n# EOF\n", "unterminated label value"),
            (b"a {b=\"c\"} 1\n# EOF\n", "invalid float \"{b=\\\"c\\\"}\""),
            (b"foo 1_2\n# EOF\n", "unsupported character in float \"1_2\""),
            (b"foo 0 1_2\n# EOF\n", "unsupported character in float \"1_2\""),
            (b"m_total 1 # {aa=bb}\n# EOF\n", "expected label value, got 'b'"),
            (
                b"m_total 1 # {aa=\"bb\"}\n# EOF\n",
                "expected value after exemplar labels, got end of line",
            ),
            (
                b"m 1 # {aa=\"bb\"} 1\n# EOF\n",
                "metric name m does not support exemplars",
            ),
            (
                b"m_total 1 # {aa=\"bb\",,cc=\"dd\"} 1\n# EOF\n",
                "expected label name, got ','",
            ),
            (b"m_total 1 # {aa=\"bb\"} true\n# EOF\n", "invalid float \"true\""),
            (
                b"m_total 1 # {aa=\"bb\"} 1 NaN\n# EOF\n",
                "invalid exemplar timestamp NaN",
            ),
            (
                b"m_total 1 # {aa=\"bb\"} 1 2 3\n# EOF\n",
                "expected end of line after exemplar timestamp, got ' '",
            ),
            (
                b"m_bucket 1 # {a=\"b\"} 1 2 \n# EOF\n",
                "expected end of line after exemplar timestamp, got ' '",
            ),
            (
                b"m_total 1 # {a=\"b\"} 1 \n# EOF\n",
                "expected exemplar timestamp, got end of line",
            ),
            (b"{b=\"c\"} 1\n# EOF\n", "expected a metric name or '# ', got '{'"),
        ];
        for (input, want) in cases {
            let e = error(input, Format::OpenMetrics);
            assert_eq!(e.message, *want, "input {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn error_display_has_line_and_truncated_context() {
        let long_value = "x".repeat(300);
        let body = format!("ok 1\n# HELP ok fine\nbad{{a=}} {long_value}\nnever 1\n");
        let mut parser = Parser::new(body.as_bytes(), Format::Text);
        assert!(matches!(parser.next_entry(), Some(Ok(_))));
        assert!(matches!(parser.next_entry(), Some(Ok(_))));
        let e = parser.next_entry().unwrap().unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(e.message, "expected label value, got '}'");
        let shown = e.to_string();
        assert!(
            shown.starts_with("expected label value, got '}' at line 3: bad{a=} xxx"),
            "{shown}"
        );
        assert_eq!(e.context.chars().count(), CONTEXT_CHARS + 1);
        assert!(e.context.ends_with('…'));
        // The parser is fused after an error.
        assert!(parser.next_entry().is_none());
        assert!(parser.next_entry().is_none());
        let e = error(b"a{b=\"\x01\" 1\n", Format::Text);
        assert_eq!(e.context, "a{b=\"\\u{1}\" 1");
    }

    #[test]
    fn blank_only_and_empty_bodies() {
        assert!(entries("", Format::Text).is_empty());
        assert!(entries("\n\n  \n# just a comment", Format::Text).is_empty());
        assert!(entries("# EOF\n", Format::OpenMetrics).is_empty());
        assert!(entries("# EOF", Format::OpenMetrics).is_empty());
    }

    #[test]
    fn byte_scans_match_scalar_reference() {
        const ALPHABET: &[u8] = b"aZ_:9\"\\ \t{}=,\n\xc3\xa9\xff.";
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for _ in 0..3000 {
            let len = rng.below(100) as usize;
            let hay: Vec<u8> = (0..len)
                .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
                .collect();
            let newline = hay.iter().position(|&b| b == b'\n');
            assert_eq!(find_newline(&hay), newline);
            for i in 0..=len {
                let rest = &hay[i..];
                let first = |pred: &dyn Fn(u8) -> bool| i + rest.iter().position(|&b| pred(b)).unwrap_or(rest.len());
                assert_eq!(scan_ident(&hay, i, true), first(&|b| !has(b, C_NAME)));
                assert_eq!(scan_ident(&hay, i, false), first(&|b| !has(b, C_LABEL)));
                assert_eq!(text_value_end(&hay, i), first(&|b| matches!(b, b' ' | b'\t' | b'{')));
                let quote = first(&|b| b == b'"' || b == b'\\');
                let mut non_ascii = false;
                assert_eq!(find_quote(&hay, i, &mut non_ascii), quote);
                assert_eq!(non_ascii, !hay[i..quote].is_ascii(), "{hay:?} {i}");
                let mask = (0..64.min(len - i))
                    .filter(|&n| hay[i + n] == b'"')
                    .fold(0u64, |m, n| m | 1 << n);
                assert_eq!(quote_mask(&hay, i), mask);
            }
        }
    }

    #[test]
    fn long_and_many_labels_iterate_exactly() {
        let mut rng = XorShift(42);
        for round in 0..400 {
            let count = 1 + rng.below(12) as usize;
            let mut expected = Vec::new();
            let mut section = String::new();
            for n in 0..count {
                let value: String = (0..rng.below(150))
                    .map(|_| match rng.below(10) {
                        0 => 'é',
                        1 => ' ',
                        2 => '🦀',
                        _ => (b'a' + rng.below(26) as u8) as char,
                    })
                    .collect();
                if n > 0 {
                    section.push(',');
                }
                section.push_str(&format!("l{n}=\"{value}\""));
                expected.push((format!("l{n}"), value));
            }
            let (body, format) = if round % 2 == 0 {
                (format!("m{{{section}}} 1\n"), Format::Text)
            } else {
                (
                    format!("m_total{{{section}}} 1 # {{{section}}} 2\n# EOF\n"),
                    Format::OpenMetrics,
                )
            };
            let got = samples(&body, format);
            assert_eq!(labels(&got[0]), expected);
            assert_eq!(got[0].label_count(), count);
            if let Some(ex) = got[0].exemplar {
                let ex_labels: Labels = ex.labels().map(|(n, v)| (n.into(), v.into())).collect();
                assert_eq!(ex_labels, expected);
            }
        }
    }

    /// Tiny xorshift64* generator: deterministic, no extra crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Parses to the end, touching everything a caller could, and checks the
    /// invariants of returned samples.
    fn drain(body: &[u8], format: Format) {
        for entry in Parser::new(body, format) {
            match entry {
                Ok(Entry::Sample(s)) => {
                    assert!(s.series.starts_with(s.name.as_bytes()));
                    assert_eq!(s.labels().count(), s.label_count());
                    // The fast iterator agrees with a plain scan of the section.
                    let mut rest = s.labels.bytes;
                    let mut reference = Vec::new();
                    while let Some((name, value, _)) = next_raw_label(&mut rest) {
                        let value = std::str::from_utf8(value).expect("validated UTF-8");
                        reference.push((
                            std::str::from_utf8(name).unwrap().to_owned(),
                            unescape(value, true).into_owned(),
                        ));
                    }
                    assert_eq!(labels(&s), reference);
                    assert!(reference
                        .iter()
                        .all(|(n, _)| !n.is_empty() && n.bytes().all(|b| has(b, C_LABEL))));
                    if let Some(ex) = s.exemplar {
                        assert_eq!(ex.labels().count(), ex.label_count());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = e.to_string();
                    break;
                }
            }
        }
    }

    #[test]
    fn fuzz_random_and_mutated_inputs_never_panic() {
        const ALPHABET: &[u8] = b"ab_:{}=\",# \t\n\\01.e+-IifnNaTYPEHELPUNITEOF\xff\xc3\x28";
        let seeds: [&[u8]; 5] = [
            OM_BODY.as_bytes(),
            b"# HELP m h\\n\n# TYPE m counter\nm_total{a=\"x\\\"y\",b=\"2\"} 1.5e3 1700000000000\nm{} NaN\n",
            b"a{b=\"c\",} +Inf\n a { b = \"c\" } -Inf 12\n",
            b"h_bucket{le=\"0.5\"} 1 # {t=\"1\"} 0.5 1.5\n# EOF\n",
            b"k_total{a=\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",b=\"\xc3\xa9\",\
              c=\"cccccccccccccccccccc\",e=\"\"} 7 # {f=\"ffffffffffffffffffffffffffffffffffffffffffffffffff\"} 1\n\
              k_total{a=\"\",d=\"x\\\\y\"} 7\n# EOF\n",
        ];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        // PARSE_FUZZ_ROUNDS=1000000 for a longer local run.
        let rounds = std::env::var("PARSE_FUZZ_ROUNDS").map_or(6000, |r| r.parse().unwrap());
        for round in 0..rounds {
            let body: Vec<u8> = if round % 3 == 0 {
                let len = rng.below(120) as usize;
                (0..len)
                    .map(|_| {
                        if rng.below(4) == 0 {
                            rng.next() as u8
                        } else {
                            ALPHABET[rng.below(ALPHABET.len() as u64) as usize]
                        }
                    })
                    .collect()
            } else {
                let mut body = seeds[rng.below(seeds.len() as u64) as usize].to_vec();
                for _ in 0..=rng.below(4) {
                    if body.is_empty() {
                        break;
                    }
                    let at = rng.below(body.len() as u64) as usize;
                    match rng.below(4) {
                        0 => body[at] = ALPHABET[rng.below(ALPHABET.len() as u64) as usize],
                        1 => body[at] = rng.next() as u8,
                        2 => {
                            body.remove(at);
                        }
                        _ => {
                            let end = (at + rng.below(16) as usize).min(body.len());
                            body.truncate(if rng.below(2) == 0 { end } else { at });
                        }
                    }
                }
                body
            };
            drain(&body, Format::Text);
            drain(&body, Format::OpenMetrics);
        }
    }
}
