//! Link interchange files: what `uload import` reads and `uload export` writes.
//!
//! - TSV: `code<TAB>url` per line; blank lines and lines starting with `#`
//!   are skipped. Lines end with LF or CRLF; in a file without a single LF,
//!   with CR (classic Mac line ends).
//! - CSV with a header row naming at least `code` and `url`; optional columns
//!   `status`, `created_at`, `expires_at`, `max_clicks`, `forward_query`,
//!   `disabled`, `owner_key_id`. Lines end as in TSV. A header the import
//!   cannot use, or a quote never closed, refuses the whole file
//!   ([`ReadError::FileRefused`]).
//! - JSON lines: one object per line with the same fields (`code` and `url`
//!   required). This is the export format, so an export re-imports as is.
//!
//! Times are RFC 3339 (`2026-11-26T18:00:00.000Z`). A row is held to the
//! same rules as `POST /api/links`: reserved codes (`api`, `health`, ...)
//! are refused, and the URL must meet the admin's policy (`admin::url`) and
//! is stored in its normal form. Every refusal names the line and the field.

use std::io::{self, BufRead};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::store::record::{Link, LinkRef, RecordError, RedirectStatus, flags_of, validate_code};

/// Input formats `uload import` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tsv,
    Csv,
    JsonLines,
}

impl Format {
    /// Guesses the format from a file name's extension.
    pub fn from_path(path: &std::path::Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "tsv" | "tab" | "txt" => Some(Self::Tsv),
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" | "json" => Some(Self::JsonLines),
            _ => None,
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tsv" => Ok(Self::Tsv),
            "csv" => Ok(Self::Csv),
            "jsonl" | "ndjson" => Ok(Self::JsonLines),
            other => Err(format!("unknown format {other:?} (tsv, csv or jsonl)")),
        }
    }
}

/// A row that was refused: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// 1-based line number in the input.
    pub line: u64,
    /// The field at fault (`code`, `url`, `status`, ..., or `row`).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.message)
    }
}

/// Why a file was refused whole: none of its rows is to be imported, not
/// even those already visited when this was found.
#[derive(Debug)]
pub enum ReadError {
    /// Reading the input failed.
    Io(io::Error),
    /// The file's rows cannot be told apart as its author meant them: a
    /// CSV header the import cannot use (an unknown, unnamed or repeated
    /// column, no `code` or `url`), or a quote never closed. Reporting that
    /// as one refused row made it look like an import that took the rest.
    FileRefused(RowError),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => e.fmt(f),
            Self::FileRefused(e) => e.fmt(f),
        }
    }
}

/// One link as a JSON object (the export format and the JSON-lines input).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LinkJson {
    pub code: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_clicks: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub forward_query: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub owner_key_id: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl LinkJson {
    /// The JSON form of a stored link.
    pub fn from_link(link: &LinkRef<'_>) -> Self {
        Self {
            code: link.code_str().to_owned(),
            url: String::from_utf8_lossy(link.target).into_owned(),
            status: Some(link.status.code()),
            created_at: Some(format_time(link.created_at_ms)),
            expires_at: link.expires_at_ms.map(format_time),
            max_clicks: link.max_clicks,
            forward_query: link.forwards_query(),
            disabled: link.is_disabled(),
            owner_key_id: link.owner_key_id,
        }
    }

    /// Validates every field and builds the link, with `defaults` for the
    /// creation time and status when the row gives none.
    pub fn into_link(self, defaults: RowDefaults) -> Result<Link, (&'static str, String)> {
        // RecordError's text starts with the field name; the caller adds it.
        let rec = |field: &'static str| {
            move |e: RecordError| {
                let text = e.to_string();
                let text = text
                    .strip_prefix(&format!("{field}: "))
                    .unwrap_or(&text)
                    .to_owned();
                (field, text)
            }
        };
        // The rules of `POST /api/links`: a code the edge routes itself is
        // refused, and the URL meets the admin's policy and is stored in its
        // normal form (non-ASCII path, query and fragment percent-encoded),
        // as the API would store it.
        if crate::admin::is_reserved(&self.code) {
            return Err((
                "code",
                format!("{:?} is reserved for the edge's own routes", self.code),
            ));
        }
        validate_code(self.code.as_bytes()).map_err(rec("code"))?;
        let target = crate::admin::normalize_target(&self.url).map_err(|e| ("url", e.message))?;
        let status = match self.status {
            Some(s) => RedirectStatus::from_code(s).map_err(rec("status"))?,
            None => defaults.status,
        };
        let created_at_ms = match &self.created_at {
            Some(t) => parse_time(t).map_err(|m| ("created_at", m))?,
            None => defaults.now_ms,
        };
        let expires_at_ms = match &self.expires_at {
            Some(t) => Some(parse_time(t).map_err(|m| ("expires_at", m))?),
            None => None,
        };
        if self.max_clicks == Some(0) {
            return Err((
                "max_clicks",
                "must be at least 1 (omit it for unlimited)".into(),
            ));
        }
        let flags = flags_of(self.disabled, self.forward_query);
        Ok(Link {
            code: self.code,
            target,
            status,
            flags,
            created_at_ms,
            expires_at_ms,
            max_clicks: self.max_clicks,
            owner_key_id: self.owner_key_id,
        })
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms.min(i64::MAX as u64) as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// The latest time [`format_time`] writes as RFC 3339 (a four-digit year):
/// `9999-12-31T23:59:59.999Z`.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// Parses an RFC 3339 time into milliseconds since the epoch (after 1970,
/// and at most [`MAX_TIME_MS`]: a time written with an offset can fall past
/// the year 9999 in UTC, which `format_time` could not write back as RFC
/// 3339, so an export would not re-import).
pub fn parse_time(text: &str) -> Result<u64, String> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time ({e})"))?;
    let ms = u64::try_from(t.timestamp_millis())
        .ok()
        .filter(|&ms| ms > 0)
        .ok_or_else(|| format!("{text:?} is not after 1970-01-01T00:00:00Z"))?;
    if ms > MAX_TIME_MS {
        return Err(format!("{text:?} is after 9999-12-31T23:59:59.999Z"));
    }
    Ok(ms)
}

/// What a row that leaves them out gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowDefaults {
    /// Creation time, in milliseconds since the epoch.
    pub now_ms: u64,
    /// Redirect status (`uload import --default-status`; the API's is
    /// `edge.default_status`).
    pub status: RedirectStatus,
}

impl RowDefaults {
    /// Created at `now_ms`, with the status a link gets by default (302).
    pub fn at(now_ms: u64) -> Self {
        Self {
            now_ms,
            status: RedirectStatus::default(),
        }
    }
}

/// Reads links from `input`, calling `visit` with each row's 1-based line
/// number and either the link or why it was refused. I/O errors, and a file
/// refused whole, end the read (see [`ReadError`]).
pub fn read_links(
    input: impl BufRead,
    format: Format,
    defaults: RowDefaults,
    mut visit: impl FnMut(u64, Result<Link, RowError>),
) -> Result<(), ReadError> {
    match format {
        // A TSV file from a classic Mac tool ends its lines with CRs; in
        // JSON lines a CR may be whitespace inside a row.
        Format::Tsv => read_lines(input, true, |line, text| {
            let text = match text {
                Ok(t) => t,
                Err(e) => return visit(line, Err(e)),
            };
            if text.trim().is_empty() || text.starts_with('#') {
                return;
            }
            let mut cols = text.split('\t');
            let (code, url) = (cols.next().unwrap_or(""), cols.next());
            let row = match (url, cols.next()) {
                (Some(url), None) => LinkJson {
                    code: code.to_owned(),
                    url: url.to_owned(),
                    ..Default::default()
                }
                .into_link(defaults)
                .map_err(|(field, message)| row_error(line, field, message)),
                (None, _) => Err(row_error(
                    line,
                    "row",
                    "expected code<TAB>url, found one column".into(),
                )),
                (Some(_), Some(_)) => Err(row_error(
                    line,
                    "row",
                    "expected 2 tab-separated columns, found more".into(),
                )),
            };
            visit(line, row);
        })
        .map_err(ReadError::Io),
        Format::JsonLines => read_lines(input, false, |line, text| {
            let text = match text {
                Ok(t) => t,
                Err(e) => return visit(line, Err(e)),
            };
            if text.trim().is_empty() {
                return;
            }
            let row = parse_json_line(text)
                .map_err(|(f, m)| row_error(line, &f, m))
                .and_then(|j| {
                    j.into_link(defaults)
                        .map_err(|(f, m)| row_error(line, f, m))
                });
            visit(line, row);
        })
        .map_err(ReadError::Io),
        Format::Csv => read_csv(input, defaults, visit),
    }
}

fn row_error(line: u64, field: &str, message: String) -> RowError {
    RowError {
        line,
        field: field.to_owned(),
        message,
    }
}

/// Parses one JSON-lines object as the admin parses a request body
/// (`admin::parse_json`): a key given twice is refused (which of the two
/// would win differs between JSON parsers), and every error names the field
/// at fault by its path (`status`, `colour`, `status.k`), or `row`.
fn parse_json_line(text: &str) -> Result<LinkJson, (String, String)> {
    crate::admin::parse_json(text.as_bytes()).map_err(|e| {
        let field = e.field.unwrap_or_else(|| "row".to_owned());
        // The admin's sentences speak of a request body; here it is a row.
        (field, e.message.replacen("the body ", "the row ", 1))
    })
}

/// The UTF-8 byte order mark, which Windows editors and spreadsheets write
/// at the start of a file.
const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

/// The byte that ends a file's lines, from its first `read_until(b'\n')`:
/// LF, unless that read ended without one, which means the file holds no LF
/// at all (the read took all of it) and CRs end its lines (classic Mac).
fn line_end_of(first_read: &[u8]) -> u8 {
    if first_read.ends_with(b"\n") {
        b'\n'
    } else {
        b'\r'
    }
}

/// Calls `visit` with each line's number and text (without its line ending,
/// nor a byte order mark at the start of the file), or a refusal for a line
/// that is not UTF-8. Lines end with LF or CRLF; with `lone_cr_ends_line`, a
/// file without a single LF has its lines ended by CRs (classic Mac line
/// ends, which the CSV reader also takes). In a file with LFs a stray CR
/// stays in its line, to be refused with it: splitting there would import
/// the part of a URL before it and shift every later line number.
fn read_lines(
    mut input: impl BufRead,
    lone_cr_ends_line: bool,
    mut visit: impl FnMut(u64, Result<&str, RowError>),
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        let cr_lines = lone_cr_ends_line && line == 0 && line_end_of(&buf) == b'\r';
        while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
            buf.pop();
        }
        // `split` yields at least one piece, possibly empty (a blank line).
        for piece in buf.split(|&b| cr_lines && b == b'\r') {
            line += 1;
            // A UTF-8 byte order mark (as Windows editors write) is not
            // part of the first line (`read_csv` strips it the same way).
            let bytes = match line {
                1 => piece.strip_prefix(BYTE_ORDER_MARK).unwrap_or(piece),
                _ => piece,
            };
            let text = std::str::from_utf8(bytes)
                .map_err(|e| row_error(line, "row", format!("not valid UTF-8 ({e})")));
            visit(line, text);
        }
    }
}

/// The columns a CSV header may name.
const CSV_COLUMNS: [&str; 9] = [
    "code",
    "url",
    "status",
    "created_at",
    "expires_at",
    "max_clicks",
    "forward_query",
    "disabled",
    "owner_key_id",
];

/// Reads a CSV file: its header, then each row. A header the import cannot
/// use, or a quote never closed, refuses the file (see [`ReadError`]).
///
/// Lines end as in [`read_lines`]: LF or CRLF, and CR only in a file without
/// a single LF. The csv crate's default terminator also ended a record at a
/// stray CR in a file with LFs, importing the part of a URL before it and
/// shifting every later line number; here the CR stays in its field, whose
/// check then refuses the row.
fn read_csv(
    mut input: impl BufRead,
    defaults: RowDefaults,
    mut visit: impl FnMut(u64, Result<Link, RowError>),
) -> Result<(), ReadError> {
    // Which byte ends the lines must be known before the parser starts:
    // the first line ends with an LF unless the file has none, and then it
    // holds all of the file (as in `read_lines`).
    let mut first_line = Vec::new();
    input.read_until(b'\n', &mut first_line)?;
    let line_end = line_end_of(&first_line);
    // Stripped here rather than by the csv crate, so that the bytes the
    // `LineTracker` follows are the bytes the parser reads.
    if first_line.starts_with(BYTE_ORDER_MARK) {
        first_line.drain(..BYTE_ORDER_MARK.len());
    }
    let lines = LineTracker::new(line_end);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .terminator(csv::Terminator::Any(line_end))
        .from_reader(lines.wrap(io::Read::chain(first_line.as_slice(), input)));

    let mut header = csv::StringRecord::new();
    let header_line = match next_record(&mut reader, &lines, &mut header)? {
        CsvRecord::Read(line) => line,
        CsvRecord::Unreadable { line, message, .. } => {
            return Err(ReadError::FileRefused(row_error(line, "header", message)));
        }
        CsvRecord::QuoteNeverClosed { line, .. } => {
            return Err(quote_never_closed(&lines, line, "header"));
        }
        CsvRecord::End => {
            return Err(ReadError::FileRefused(row_error(
                1,
                "header",
                "missing: the file holds no rows (a CSV file starts with a header naming \
                 at least code and url)"
                    .into(),
            )));
        }
    };
    check_csv_header(&header)
        .map_err(|message| ReadError::FileRefused(row_error(header_line, "header", message)))?;
    // The name of a column, for a refusal in it; a column past the header's
    // (or none known) is not the field of any link.
    let field = |column: Option<usize>| column.and_then(|c| header.get(c)).map_or("row", str::trim);
    let mut record = csv::StringRecord::new();
    loop {
        match next_record(&mut reader, &lines, &mut record)? {
            CsvRecord::Read(line) => visit(
                line,
                csv_row(&header, &record, defaults).map_err(|(f, m)| row_error(line, f, m)),
            ),
            CsvRecord::Unreadable {
                line,
                column,
                message,
            } => visit(line, Err(row_error(line, field(column), message))),
            CsvRecord::QuoteNeverClosed { line, column } => {
                return Err(quote_never_closed(&lines, line, field(Some(column))));
            }
            CsvRecord::End => return Ok(()),
        }
    }
}

/// Why the CSV header cannot be used, if it cannot.
fn check_csv_header(header: &csv::StringRecord) -> Result<(), String> {
    for (i, name) in header.iter().map(str::trim).enumerate() {
        if name.is_empty() {
            // Spreadsheets write a comma after the last column when a cell
            // past it was ever touched.
            let trailing = if i + 1 == header.len() {
                " (the header ends with a comma)"
            } else {
                ""
            };
            return Err(format!("column {} has no name{trailing}", i + 1));
        }
        if !CSV_COLUMNS.contains(&name) {
            return Err(format!(
                "unknown column {name:?} (the columns are {})",
                CSV_COLUMNS.join(", ")
            ));
        }
        // A column given twice: which value would count is anyone's guess.
        if header.iter().skip(i + 1).any(|h| h.trim() == name) {
            return Err(format!("column {name:?} appears twice"));
        }
    }
    match ["code", "url"]
        .into_iter()
        .find(|required| !header.iter().any(|h| h.trim() == *required))
    {
        Some(missing) => Err(format!("missing the {missing:?} column")),
        None => Ok(()),
    }
}

/// What [`next_record`] found.
#[derive(Debug)]
enum CsvRecord {
    /// A record, starting on this line.
    Read(u64),
    /// A record starting on `line` that cannot be read (one not UTF-8), at
    /// fault in `column` (0-based) when the parser says which.
    Unreadable {
        line: u64,
        column: Option<usize>,
        message: String,
    },
    /// A quote opened on `line`, in `column` (0-based), is never closed: the
    /// record read holds the rest of the file.
    QuoteNeverClosed { line: u64, column: usize },
    /// The end of the file.
    End,
}

/// Reads the next record that is not a blank line into `record`.
fn next_record<R: io::Read>(
    reader: &mut csv::Reader<Tracked<R>>,
    lines: &LineTracker,
    record: &mut csv::StringRecord,
) -> io::Result<CsvRecord> {
    loop {
        let read = reader.read_record(record);
        // Before what the record holds: a record that takes in the rest of
        // the file is no row of its author's, and neither are its pieces.
        if let Some((line, column)) = lines.open_quote_at_end() {
            return Ok(CsvRecord::QuoteNeverClosed { line, column });
        }
        return match read {
            Ok(false) => Ok(CsvRecord::End),
            // With LF as the terminator, the CR of a blank CRLF line is a
            // record of its own; the csv crate skips the blank line itself.
            Ok(true) if record.len() == 1 && record.get(0).is_some_and(is_carriage_returns) => {
                continue;
            }
            Ok(true) => Ok(CsvRecord::Read(
                lines.line_at(record.position().map_or(0, csv::Position::byte)),
            )),
            Err(e) => {
                let line = lines.line_at(e.position().map_or(0, csv::Position::byte));
                match e.kind() {
                    csv::ErrorKind::Io(_) => Err(e.into()),
                    // The csv crate's message gives its own line count,
                    // which is not the line the record starts on.
                    csv::ErrorKind::Utf8 { err, .. } => Ok(CsvRecord::Unreadable {
                        line,
                        column: Some(err.field()),
                        message: format!(
                            "not valid UTF-8 (after byte {} of the field)",
                            err.valid_up_to()
                        ),
                    }),
                    _ => Ok(CsvRecord::Unreadable {
                        line,
                        column: None,
                        message: e.to_string(),
                    }),
                }
            }
        };
    }
}

/// Whether `text` is one or more CRs and nothing else.
fn is_carriage_returns(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b == b'\r')
}

/// The refusal of a file in which the quote opened on `line`, in `field`, is
/// never closed. The whole file is refused, not the one row: the parser
/// took every line after it into that field, so no row after it was read,
/// and a file broken so may be broken before it too in ways no check sees.
/// Refusing all of it also lets the corrected file be imported again
/// without `--overwrite` refusing the rows a first run took.
fn quote_never_closed(lines: &LineTracker, line: u64, field: &str) -> ReadError {
    let rest = match lines.last_line().saturating_sub(line) {
        0 => "the file ends inside it".to_owned(),
        1 => "it takes the line after it, the last of the file, into one field".to_owned(),
        n => format!("it takes the {n} lines after it, to the end of the file, into one field"),
    };
    ReadError::FileRefused(row_error(
        line,
        field,
        format!("the quote opened on this line is never closed: {rest}"),
    ))
}

/// The line each CSV record starts on, and whether a quote is left open at
/// the end of the file.
///
/// The csv crate's own line count is taken where the previous record ended:
/// before any blank lines, so after a blank line it named an earlier line.
/// Its byte offset is right, so this counts lines in the bytes as they pass
/// to the reader and keeps, for the bytes read ahead, where each line's
/// content starts: a record starts at the first such place at or after its
/// offset (only line ends lie between). A line ends at the file's line end
/// byte alone (LF, or CR in a file without LFs), inside a quoted field too:
/// a stray CR in a file with LFs is no line break, as in [`read_lines`].
///
/// The csv crate ends a quoted field left open at the end of the file as if
/// it were closed, so this follows the quoting as the parser does to tell.
#[derive(Debug, Clone)]
struct LineTracker(std::rc::Rc<std::cell::RefCell<LineTrack>>);

#[derive(Debug)]
struct LineTrack {
    /// The byte that ends a line (and a record, outside quotes).
    line_end: u8,
    /// Bytes read so far.
    offset: u64,
    /// Line ends read so far.
    newlines: u64,
    /// Whether the last byte read ended a line (or none was read).
    after_break: bool,
    /// (offset, 1-based line) of each content start read ahead.
    starts: std::collections::VecDeque<(u64, u64)>,
    /// The line of the last start passed over.
    last_line: u64,
    /// Where the parser is in the quoting of the bytes read so far.
    quoting: Quoting,
    /// The column (0-based) the parser is in.
    column: usize,
    /// Whether the input has ended.
    eof: bool,
}

/// The quoting states of the csv crate's parser (`csv_core`, with its
/// defaults: `"` quotes, `""` in a quoted field is one `"`, no escape
/// character). A quoted field keeps where it opened, for the refusal if it
/// is never closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// At the start of a field, where a `"` opens a quoted field.
    FieldStart,
    /// In a field that is not quoted, where a `"` is just a character.
    Unquoted,
    /// In a quoted field opened on `line`, in `column`.
    Quoted { line: u64, column: usize },
    /// After a `"` in a quoted field: it closed the field, unless another
    /// `"` follows (the two stand for one).
    QuoteInQuoted { line: u64, column: usize },
}

struct Tracked<R> {
    inner: R,
    track: LineTracker,
}

impl LineTracker {
    fn new(line_end: u8) -> Self {
        Self(std::rc::Rc::new(std::cell::RefCell::new(LineTrack {
            line_end,
            offset: 0,
            newlines: 0,
            after_break: true,
            starts: Default::default(),
            last_line: 0,
            quoting: Quoting::FieldStart,
            column: 0,
            eof: false,
        })))
    }

    fn wrap<R: io::Read>(&self, inner: R) -> Tracked<R> {
        Tracked {
            inner,
            track: self.clone(),
        }
    }

    /// The line of the record whose position is `byte`.
    fn line_at(&self, byte: u64) -> u64 {
        let mut t = self.0.borrow_mut();
        while let Some(&(offset, line)) = t.starts.front() {
            if offset >= byte {
                return line;
            }
            t.last_line = line;
            t.starts.pop_front();
        }
        t.last_line.max(1)
    }

    /// The number of the file's last line (once the input has ended).
    fn last_line(&self) -> u64 {
        let t = self.0.borrow();
        t.newlines + u64::from(!t.after_break)
    }

    /// (line, column) of a quote still open at the end of the input. The
    /// parser reads on only when it has used up all it read, so once the
    /// input has ended, the record it returns last holds the open quote.
    fn open_quote_at_end(&self) -> Option<(u64, usize)> {
        let t = self.0.borrow();
        match t.quoting {
            Quoting::Quoted { line, column } if t.eof => Some((line, column)),
            _ => None,
        }
    }
}

impl<R: io::Read> io::Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut t = self.track.0.borrow_mut();
        t.eof |= n == 0 && !buf.is_empty();
        for &b in buf.get(..n).unwrap_or_default() {
            let line_break = b == t.line_end;
            if !line_break && t.after_break {
                let start = (t.offset, t.newlines + 1);
                t.starts.push_back(start);
            }
            let ends_field = line_break || b == b',';
            t.quoting = match t.quoting {
                Quoting::FieldStart if b == b'"' => Quoting::Quoted {
                    line: t.newlines + 1,
                    column: t.column,
                },
                Quoting::Quoted { line, column } if b == b'"' => {
                    Quoting::QuoteInQuoted { line, column }
                }
                Quoting::QuoteInQuoted { line, column } if b == b'"' => {
                    Quoting::Quoted { line, column }
                }
                quoted @ Quoting::Quoted { .. } => quoted,
                _ if ends_field => {
                    t.column = if line_break { 0 } else { t.column + 1 };
                    Quoting::FieldStart
                }
                _ => Quoting::Unquoted,
            };
            t.newlines += u64::from(line_break);
            t.after_break = line_break;
            t.offset += 1;
        }
        Ok(n)
    }
}

fn csv_row(
    headers: &csv::StringRecord,
    record: &csv::StringRecord,
    defaults: RowDefaults,
) -> Result<Link, (&'static str, String)> {
    if record.len() != headers.len() {
        return Err((
            "row",
            format!(
                "has {} columns, the header has {}",
                record.len(),
                headers.len()
            ),
        ));
    }
    let mut j = LinkJson::default();
    for (name, value) in headers.iter().zip(record.iter()) {
        let value = value.trim();
        let number = |field: &'static str| {
            value
                .parse::<u64>()
                .map_err(|_| (field, format!("{value:?} is not a number")))
        };
        let boolean = |field: &'static str| match value.to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "no" => Ok(false),
            "1" | "true" | "yes" => Ok(true),
            _ => Err((field, format!("{value:?} is not true or false"))),
        };
        let optional = || (!value.is_empty()).then(|| value.to_owned());
        match name.trim() {
            "code" => j.code = value.to_owned(),
            "url" => j.url = value.to_owned(),
            "status" if !value.is_empty() => {
                let n = number("status")?;
                j.status = Some(
                    u16::try_from(n)
                        .map_err(|_| ("status", format!("{n} is not a redirect status")))?,
                );
            }
            "created_at" => j.created_at = optional(),
            "expires_at" => j.expires_at = optional(),
            "max_clicks" if !value.is_empty() => j.max_clicks = Some(number("max_clicks")?),
            "forward_query" => j.forward_query = boolean("forward_query")?,
            "disabled" => j.disabled = boolean("disabled")?,
            "owner_key_id" if !value.is_empty() => j.owner_key_id = number("owner_key_id")?,
            _ => {}
        }
    }
    j.into_link(defaults)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(format: Format, text: &str) -> Vec<Result<Link, RowError>> {
        read_bytes(format, text.as_bytes())
    }

    /// The rows of a file that is not refused whole.
    fn read_bytes(format: Format, bytes: &[u8]) -> Vec<Result<Link, RowError>> {
        let mut out = Vec::new();
        read_links(bytes, format, RowDefaults::at(1_000), |_, r| out.push(r)).unwrap();
        out
    }

    /// Why `text` is refused whole; panics if it is not.
    fn refused_file(format: Format, text: &str) -> RowError {
        match read_links(text.as_bytes(), format, RowDefaults::at(1_000), |_, _| {}) {
            Err(ReadError::FileRefused(e)) => e,
            other => panic!("{text:?} was not refused whole: {other:?}"),
        }
    }

    /// (line, field) of each refused row; panics on an accepted one.
    fn refusals(rows: &[Result<Link, RowError>]) -> Vec<(u64, String)> {
        rows.iter()
            .map(|r| {
                let e = r.as_ref().unwrap_err();
                (e.line, e.field.clone())
            })
            .collect()
    }

    #[test]
    fn tsv_rows_and_errors() {
        let rows = read(
            Format::Tsv,
            "# comment\nabc\thttps://a.example/\n\nbad code\thttps://b/\nonly\nx\thttps://c/\textra\nok\tjavascript:alert(1)\n",
        );
        assert_eq!(rows.len(), 5);
        let link = rows[0].as_ref().unwrap();
        assert_eq!(
            (link.code.as_str(), link.target.as_str(), link.created_at_ms),
            ("abc", "https://a.example/", 1_000)
        );
        let errs = refusals(&rows[1..]);
        assert_eq!(
            errs,
            [
                (4, "code".into()),
                (5, "row".into()),
                (6, "row".into()),
                (7, "url".into())
            ]
        );
    }

    #[test]
    fn tsv_lines_may_end_with_a_lone_cr_and_json_rows_may_hold_one() {
        // A file without LFs: CRs end its lines.
        let rows = read(
            Format::Tsv,
            "a\thttps://x/\rb\thttps://y/\r\rbad code\thttps://z/\rc\thttps://w/\r",
        );
        let codes: Vec<_> = rows
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|l| l.code.as_str()))
            .collect();
        assert_eq!(codes, ["a", "b", "c"]);
        let refused: Vec<_> = rows
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| (e.line, e.field.as_str())))
            .collect();
        assert_eq!(refused, [(4, "code")]);
        // A file with LFs: a stray CR stays in its line, which is refused
        // whole, and the lines after it keep their numbers.
        let rows = read(
            Format::Tsv,
            "a\thttps://x.example/p\rq\nb\thttps://y.example/\nbad code\thttps://z/\n",
        );
        let refused: Vec<_> = rows
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| (e.line, e.field.as_str())))
            .collect();
        assert_eq!(refused, [(1, "url"), (3, "code")]);
        assert_eq!(rows[1].as_ref().unwrap().code, "b");
        // In JSON lines a CR between tokens is whitespace, not a line end.
        let rows = read(
            Format::JsonLines,
            "{\"code\":\"a\",\r\"url\":\"https://x/\"}\r\n{\"code\":\"b\",\"url\":\"https://y/\"}\n",
        );
        assert!(rows.iter().all(|r| r.is_ok()), "{rows:?}");
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn csv_with_header_and_options() {
        let rows = read(
            Format::Csv,
            "code,url,status,max_clicks,forward_query,expires_at\n\
             a,\"https://x/?a=1,2\",301,5,true,2030-01-01T00:00:00Z\n\
             b,https://y/,303,,,\n\
             c,https://z/,302,many,,\n\
             d,https://w/\n",
        );
        let a = rows[0].as_ref().unwrap();
        assert_eq!(a.target, "https://x/?a=1,2");
        assert_eq!(a.status, RedirectStatus::MovedPermanently);
        assert_eq!(a.max_clicks, Some(5));
        assert!(a.forwards_query());
        assert_eq!(a.expires_at_ms, Some(1_893_456_000_000));
        let fields = refusals(&rows[1..]);
        assert_eq!(
            fields,
            [
                (3, "status".into()),
                (4, "max_clicks".into()),
                (5, "row".into())
            ]
        );
    }

    /// A stray CR in a CSV file with LFs stays in its row, which is refused
    /// whole (its URL then holds a control character), and later rows keep
    /// their line numbers: the csv crate's default terminator ended the
    /// record there, importing `https://x.example/p` and numbering every
    /// later line one too high. In a file without LFs CRs end the lines
    /// (`cli_input::csv_refusals_name_the_right_line`, `cr.csv`).
    #[test]
    fn csv_stray_cr_in_an_lf_file_stays_in_its_row() {
        let rows = read(
            Format::Csv,
            "code,url\na,https://x.example/p\rq\nb,https://y.example/\nbad x,https://z.example/\n",
        );
        let imported: Vec<(&str, &str)> = rows
            .iter()
            .filter_map(|r| {
                r.as_ref()
                    .ok()
                    .map(|l| (l.code.as_str(), l.target.as_str()))
            })
            .collect();
        assert_eq!(imported, [("b", "https://y.example/")], "{rows:?}");
        let refused: Vec<_> = rows
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| (e.line, e.field.as_str())))
            .collect();
        assert_eq!(refused, [(2, "url"), (4, "code")]);
    }

    /// A header the import cannot use refuses the file, naming the line it
    /// is on: it was one refused row, of line 1 whatever blank lines came
    /// before, in an import that went on as if it had taken the rest.
    #[test]
    fn csv_header_problems() {
        for (text, line, message) in [
            (
                "code,target\na,https://x/\n",
                1,
                "unknown column \"target\" (the columns are code, url, status, created_at, \
                 expires_at, max_clicks, forward_query, disabled, owner_key_id)",
            ),
            ("code\na\n", 1, "missing the \"url\" column"),
            (
                "\r\n\r\nurl\r\nhttps://x/\r\n",
                3,
                "missing the \"code\" column",
            ),
            // A column given twice: which value would count is anyone's guess.
            (
                "code,url, url\na,https://x/,https://y/\n",
                1,
                "column \"url\" appears twice",
            ),
            (
                "\ncode,url,\na,https://x/,\n",
                2,
                "column 3 has no name (the header ends with a comma)",
            ),
            ("code,,url\n", 1, "column 2 has no name"),
            ("", 1, "missing: the file holds no rows"),
            ("\n\n", 1, "missing: the file holds no rows"),
        ] {
            let e = refused_file(Format::Csv, text);
            assert_eq!(
                (e.line, e.field.as_str()),
                (line, "header"),
                "{text:?}: {e}"
            );
            assert!(e.message.starts_with(message), "{text:?}: {e}");
        }
    }

    /// A quote never closed takes the rest of the file into one field: the
    /// file is refused, naming the line the quote opened on, its column and
    /// how many lines it took. Only a blamed URL and silence about the rows
    /// after it were reported.
    #[test]
    fn csv_quote_never_closed_refuses_the_file() {
        for (text, line, field, message) in [
            (
                "code,url\na,\"https://x/\nb,https://y/\n\nc,https://z/\n",
                2,
                "url",
                "it takes the 3 lines after it, to the end of the file, into one field",
            ),
            (
                "code,url\r\na,https://x/\r\n\"b,https://y/\r\nc,https://z/",
                3,
                "code",
                "it takes the line after it, the last of the file, into one field",
            ),
            (
                "code,url\na,\"https://x/",
                2,
                "url",
                "the file ends inside it",
            ),
            // A doubled quote inside quotes is one quote, not the close.
            (
                "code,url\na,\"https://x/\"\"\n",
                2,
                "url",
                "the file ends inside it",
            ),
            (
                "\"code,url\na,https://x/\n",
                1,
                "header",
                "it takes the line after it",
            ),
            // Without LFs, CRs end the lines inside the quote too.
            (
                "code,url\ra,\"https://x/\rb,https://y/\r",
                2,
                "url",
                "it takes the line",
            ),
        ] {
            let e = refused_file(Format::Csv, text);
            assert_eq!((e.line, e.field.as_str()), (line, field), "{text:?}: {e}");
            assert!(
                e.message
                    .starts_with("the quote opened on this line is never closed: "),
                "{text:?}: {e}"
            );
            assert!(e.message.contains(message), "{text:?}: {e}");
        }
        // Closed quotes, line breaks inside them, doubled quotes and a quote
        // inside an unquoted field (a plain character there) are no problem.
        let rows = read(
            Format::Csv,
            "code,url\n\"a\",\"https://x/?q=\"\"1\"\"\"\nb,https://y/?q=\"\n\"c\",\"https://z/\n\"\n",
        );
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows.iter().all(|r| r.is_ok()), "{rows:?}");
    }

    #[test]
    fn json_lines_refuse_a_key_given_twice() {
        let rows = read(
            Format::JsonLines,
            "{\"code\":\"a\",\"url\":\"https://x/\",\"url\":\"https://y/\"}\n{\"code\":\"b\",\"url\":\"https://x/\"} trailing\n{\"code\":\"c\",\"url\":\"https://x/\"}\n",
        );
        let e = rows[0].as_ref().unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str(), e.message.as_str()),
            (1, "url", "duplicate field `url`")
        );
        let e = rows[1].as_ref().unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "row"));
        assert!(e.message.starts_with("the row is not valid JSON"), "{e}");
        assert_eq!(rows[2].as_ref().unwrap().code, "c");
        // A key twice inside a value is named by its path, not as a field.
        let rows = read(
            Format::JsonLines,
            "{\"code\":\"d\",\"url\":\"https://x/\",\"status\":{\"k\":1,\"k\":2}}\n",
        );
        assert_eq!(rows[0].as_ref().unwrap_err().field, "status.k");
    }

    #[test]
    fn json_lines_round_trip_through_export_form() {
        let mut link = Link::new("Zz9", "https://example.com/p?q").unwrap();
        link.expires_at_ms = Some(1_900_000_000_123);
        link.max_clicks = Some(3);
        link.flags = flags_of(true, true);
        link.owner_key_id = 12;
        let line = serde_json::to_string(&LinkJson::from_link(&link.as_ref())).unwrap();
        let rows = read(Format::JsonLines, &format!("{line}\n"));
        assert_eq!(rows[0].as_ref().unwrap(), &link);
    }

    #[test]
    fn json_lines_errors_name_fields() {
        let rows = read(
            Format::JsonLines,
            "{\"code\":\"a\"}\n{\"code\":\"a\",\"url\":\"https://x/\",\"status\":\"301\"}\n{\"code\":\"a\",\"url\":\"https://x/\",\"colour\":1}\nnot json\n{\"code\":\"a\",\"url\":\"https://x/\",\"expires_at\":\"tomorrow\"}\n",
        );
        let fields: Vec<String> = rows
            .iter()
            .map(|r| r.as_ref().unwrap_err().field.clone())
            .collect();
        assert_eq!(fields, ["url", "status", "colour", "row", "expires_at"]);
        assert!(rows[2].as_ref().unwrap_err().message.contains("colour"));
    }

    #[test]
    fn times_round_trip_up_to_year_9999() {
        assert_eq!(parse_time("9999-12-31T23:59:59.999Z"), Ok(MAX_TIME_MS));
        assert_eq!(format_time(MAX_TIME_MS), "9999-12-31T23:59:59.999Z");
        // In UTC this is 10000-01-01T23:58:59Z, which format_time writes as
        // "+10000-...", not RFC 3339 (fuzz input
        // import_jsonl/expires-after-year-9999.jsonl).
        let e = parse_time("9999-12-31T23:59:59-23:59").unwrap_err();
        assert!(e.contains("after 9999"), "{e}");
        assert!(parse_time("1970-01-01T00:00:00Z").is_err());
    }

    /// An imported row meets the rules of `POST /api/links`: a reserved code
    /// (which the edge routes itself) or a URL the admin's policy refuses
    /// (credentials, an invisible or bidirectional character, a non-ASCII
    /// host, a backslash in the authority, a bad port) is a refused row.
    #[test]
    fn imported_rows_meet_the_api_rules() {
        let rows = read(
            Format::Tsv,
            "api\thttps://a.example/\n\
             Health\thttps://a.example/\n\
             creds\thttps://bank.example@evil.example/\n\
             bidi\thttps://example.com/\u{202E}gpj.exe\n\
             homograph\thttps://\u{430}pple.com/\n\
             slash\thttps://evil.example\\.good.example/\n\
             port\thttps://example.com:99999/\n",
        );
        assert_eq!(
            refusals(&rows),
            [
                (1, "code".into()),
                (2, "code".into()),
                (3, "url".into()),
                (4, "url".into()),
                (5, "url".into()),
                (6, "url".into()),
                (7, "url".into()),
            ]
        );
        let e = rows[0].as_ref().unwrap_err();
        assert!(e.message.contains("reserved"), "{e}");
        let rows = read(
            Format::JsonLines,
            "{\"code\":\"metrics\",\"url\":\"https://x.example/\"}\n",
        );
        assert_eq!(refusals(&rows), [(1, "code".into())]);
    }

    /// A non-ASCII path or query is stored percent-encoded, as the API
    /// stores it, so the `Location` header stays ASCII.
    #[test]
    fn imported_urls_are_normalised_as_the_api_does() {
        let rows = read(Format::Tsv, "p\thttps://example.com/\u{30d1}?q=\u{5024}\n");
        let link = rows[0].as_ref().unwrap();
        assert_eq!(link.target, "https://example.com/%E3%83%91?q=%E5%80%A4");
    }

    #[test]
    fn invalid_utf8_is_a_refused_row() {
        let out = read_bytes(Format::Tsv, b"a\thttps://x/\xff\n");
        assert_eq!(out.len(), 1);
        let e = out[0].as_ref().unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (1, "row"));
        assert!(e.message.contains("UTF-8"), "{e}");
        // In CSV the column is known, and the row's own line is named (the
        // csv crate's message gave its own count of lines as well).
        let out = read_bytes(Format::Csv, b"code,url\n\na,https://x/\xff\nb,https://y/\n");
        assert_eq!(out.len(), 2);
        let e = out[0].as_ref().unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "url"));
        assert_eq!(e.message, "not valid UTF-8 (after byte 10 of the field)");
        assert!(out[1].is_ok());
    }
}
