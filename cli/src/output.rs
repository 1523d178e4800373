//! Output formatting: every command describes its rows once, as a list of
//! [`Column`]s (a snake_case key for JSON/CSV, a human header for tables, and an
//! accessor), and [`Output`] renders them as a table, JSON or CSV.
//!
//! JSON: lists are arrays of objects, single results are objects; enums are
//! strings, unset times are `null`, USD amounts are numbers with exact
//! micro-dollar precision. CSV: a header row of the JSON keys, then one line per
//! row. Tables: human headers; a single result is shown as a two-column
//! field/value table.

use std::io::Write;

use anyhow::{Context, Result};
use comfy_table::{presets, ColumnConstraint, ContentArrangement, Table, Width};
use serde_json::{Map, Number};

use crate::parse::{format_micros, format_time};

/// How results are printed (`-o/--output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// A table of the main columns, short ids, times to the second.
    #[default]
    Table,
    /// A table of every column, full ids and times.
    Wide,
    /// JSON (`jsonl` is the same: `requests export` and `tail` write one object a line).
    #[value(alias = "jsonl")]
    Json,
    Csv,
}

/// One cell of output.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    UInt(u64),
    Int(i64),
    Bool(bool),
    /// An exact decimal (a USD amount), emitted in JSON as a number.
    Decimal(String),
    /// Unix milliseconds; 0 means unset.
    Time(i64),
    /// A list of strings; `empty` is what a table shows when it is empty.
    List {
        items: Vec<String>,
        empty: &'static str,
    },
    /// Structured data (JSON in JSON output, compact JSON text elsewhere).
    Json(serde_json::Value),
    /// Structured data for JSON, with the text people read in tables and CSV ("-" when empty).
    Described {
        json: serde_json::Value,
        text: String,
    },
    /// An id: whole in JSON, CSV and wide tables; in list tables its shortest prefix (at least
    /// [`SHORT_ID`] characters) that tells it from every other id of its column, like git's short
    /// hashes (see [`unique_prefix_len`]); commands take such a prefix wherever they take an id.
    Id(String),
    /// A limit where zero means unlimited: tables show `-` for it, JSON and
    /// CSV the value itself.
    Limit {
        value: Box<Value>,
        unlimited: bool,
    },
}

impl Value {
    pub fn text(s: &str) -> Self {
        Value::Text(s.to_string())
    }

    /// Text where the empty string means "not set" (`null` / `-`).
    pub fn opt_text(s: &str) -> Self {
        if s.is_empty() {
            Value::Null
        } else {
            Value::text(s)
        }
    }

    pub fn list(items: &[String], empty: &'static str) -> Self {
        Value::List {
            items: items.to_vec(),
            empty,
        }
    }

    /// A count limit; 0 = unlimited.
    pub fn limit(n: u64) -> Self {
        Value::Limit {
            value: Box::new(Value::UInt(n)),
            unlimited: n == 0,
        }
    }

    /// A USD amount from micro-USD (exact), where 0 = unlimited.
    pub fn budget(micros: u64) -> Self {
        Value::Limit {
            value: Box::new(Value::usd(micros)),
            unlimited: micros == 0,
        }
    }

    /// A USD amount from micro-USD (exact; 2 to 6 decimals).
    pub fn usd(micros: u64) -> Self {
        Value::Decimal(format_micros(micros))
    }

    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Text(s) => J::String(s.clone()),
            Value::UInt(n) => J::from(*n),
            Value::Int(n) => J::from(*n),
            Value::Bool(b) => J::Bool(*b),
            // Number::from_str keeps the exact decimal with `arbitrary_precision`
            // and otherwise parses that exact string to the nearest f64.
            Value::Decimal(s) => s.parse::<Number>().map_or_else(|_| J::String(s.clone()), J::Number),
            Value::Time(ms) => format_time(*ms).map_or(J::Null, J::String),
            Value::List { items, .. } => J::Array(items.iter().cloned().map(J::String).collect()),
            Value::Json(v) => v.clone(),
            Value::Described { json, .. } => json.clone(),
            Value::Limit { value, .. } => value.to_json(),
            Value::Id(s) => J::String(s.clone()),
        }
    }

    fn to_cell(&self, wide: bool) -> String {
        match self {
            Value::Null => "-".into(),
            Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
            Value::Time(ms) if wide => format_time(*ms).unwrap_or_else(|| "-".into()),
            Value::Time(ms) => chrono::DateTime::<chrono::Utc>::from_timestamp_millis(*ms)
                .filter(|_| *ms != 0)
                .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            Value::Id(s) if !wide => short_id(s, SHORT_ID),
            Value::List { items, empty } if items.is_empty() => (*empty).into(),
            Value::List { items, .. } => items.join(", "),
            // Nothing to show reads as nothing, not as `null` or `[]`.
            Value::Json(v) if v.is_null() || v.as_array().is_some_and(Vec::is_empty) => "-".into(),
            Value::Json(v) if v.as_object().is_some_and(serde_json::Map::is_empty) => "-".into(),
            Value::Described { text, .. } if text.is_empty() => "-".into(),
            Value::Limit { unlimited: true, .. } => UNLIMITED.into(),
            Value::Limit { value, .. } => value.to_cell(wide),
            other => other.to_csv(),
        }
    }

    fn to_csv(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Text(s) | Value::Decimal(s) => s.clone(),
            Value::UInt(n) => n.to_string(),
            Value::Int(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Time(ms) => format_time(*ms).unwrap_or_default(),
            Value::List { items, .. } => items.join(";"),
            Value::Json(v) => v.to_string(),
            Value::Described { text, .. } => text.clone(),
            Value::Limit { value, .. } => value.to_csv(),
            Value::Id(s) => s.clone(),
        }
    }
}

/// `text` with its control characters (escape sequences, carriage returns, bells) shown as
/// `\u{..}` escapes, newlines and tabs aside (a table lays those out): what a table prints of
/// values a client or an upstream chose (a model name, an error message) must not drive the
/// operator's terminal.
pub fn printable(text: &str) -> String {
    escape_controls(text, |c| c == '\n' || c == '\t')
}

/// The most characters a table cell shows (JSON and CSV keep everything): a cell of
/// thousands of words made the table library overflow.
const MAX_CELL: usize = 2_000;

/// A table cell's text: [`printable`], cut at [`MAX_CELL`] characters with a note saying so.
fn cell(text: &str) -> String {
    let text = printable(text);
    match text.char_indices().nth(MAX_CELL) {
        None => text,
        Some((cut, _)) => {
            let more = text[cut..].chars().count();
            format!("{}… ({more} more characters; -o json shows all)", &text[..cut])
        }
    }
}

/// [`printable`] for one line of output: newlines are escaped too.
pub fn printable_line(text: &str) -> String {
    escape_controls(text, |_| false)
}

fn escape_controls(text: &str, keep: impl Fn(char) -> bool) -> String {
    let escaped = |c: char| c.is_control() && !keep(c);
    if !text.chars().any(escaped) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if escaped(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Characters of an id a table shows at least.
pub const SHORT_ID: usize = 8;

/// The first `len` characters of `id`, one more when that would end on a `-` of a UUID.
fn short_id(id: &str, len: usize) -> String {
    let mut short: String = id.chars().take(len).collect();
    if short.ends_with('-') {
        short.extend(id.chars().nth(len));
    }
    short
}

/// How many characters of each id a table shows so that no two ids of a column look the same:
/// at least `min`, else the shortest prefix length that tells every pair apart. relay's ids are
/// UUIDv7s, whose first 12 hex digits are the creation time in milliseconds: things made within
/// a minute share 8 characters, within a millisecond 13 or more, so the length grows to what the
/// listing needs (`01a240bb-3e8` and `01a240bb-3e9`), the same for the whole column.
pub fn unique_prefix_len<'a>(ids: impl IntoIterator<Item = &'a str>, min: usize) -> usize {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    let common = |a: &str, b: &str| a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    ids.windows(2).map(|w| common(w[0], w[1]) + 1).fold(min, usize::max)
}
/// How every table shows a limit or budget of 0.
pub const UNLIMITED: &str = "unlimited";

/// How one field of a `T` is shown.
pub struct Column<T> {
    /// snake_case name in JSON and CSV.
    pub key: &'static str,
    /// Human header in tables.
    pub header: &'static str,
    /// Whether list tables show it (JSON, CSV and single-result tables always do).
    pub in_table: bool,
    /// A short form of detail columns (priority and weight as "10/3"): list tables
    /// show it, and nothing else does (the detail columns stand in for it).
    pub summary: bool,
    pub get: fn(&T) -> Value,
}

impl<T> Column<T> {
    pub const fn new(key: &'static str, header: &'static str, get: fn(&T) -> Value) -> Self {
        Column {
            key,
            header,
            in_table: true,
            summary: false,
            get,
        }
    }

    /// A column list tables leave out (too wide or too detailed).
    pub const fn detail(key: &'static str, header: &'static str, get: fn(&T) -> Value) -> Self {
        Column {
            key,
            header,
            in_table: false,
            summary: false,
            get,
        }
    }

    /// A list-table-only short form of detail columns: JSON, CSV, wide tables and
    /// the full view of one item show those columns instead.
    pub const fn summary(key: &'static str, header: &'static str, get: fn(&T) -> Value) -> Self {
        Column {
            key,
            header,
            in_table: true,
            summary: true,
            get,
        }
    }
}

/// The JSON object for one item.
pub fn json_object<T>(cols: &[Column<T>], item: &T) -> Map<String, serde_json::Value> {
    cols.iter()
        .filter(|c| !c.summary)
        .map(|c| (c.key.to_string(), (c.get)(item).to_json()))
        .collect()
}

/// A table as wide as the terminal (`width`: a fixed width instead, for tests).
fn new_table(width: Option<u16>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    // Not a terminal (piped, captured): `COLUMNS`, when set, is the width to fit, as for other
    // tools; a terminal's own width is read by the table itself.
    let width = width.or_else(|| {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            return None;
        }
        std::env::var("COLUMNS")
            .ok()?
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|w| *w >= 40)
    });
    if let Some(w) = width {
        t.set_width(w);
    }
    t
}

/// Longest word a table keeps whole; longer ones (URLs, whole UUIDs) may be cut.
const WHOLE_WORD: usize = 32;

/// The table as text, its words whole: no column is narrowed below its longest word (up to
/// [`WHOLE_WORD`], plus padding), so a narrow terminal wraps cells between words
/// (`cooldown.rate_limit_default_ms` stays one piece). A table whose words cannot fit is wider
/// than the terminal instead.
fn finish(mut t: Table) -> String {
    let longest_word = |text: &str| {
        text.split_whitespace()
            .map(|w| w.chars().count().min(WHOLE_WORD))
            .max()
            .unwrap_or(0)
    };
    let mut widths = vec![0usize; t.column_count()];
    let rows = t.header().into_iter().chain(t.row_iter());
    for row in rows {
        for (i, cell) in row.cell_iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(longest_word(&cell.content()));
            }
        }
    }
    for (col, w) in t.column_iter_mut().zip(widths) {
        let w = u16::try_from(w + 2).unwrap_or(u16::MAX);
        col.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(w)));
    }
    format!("{t}\n")
}

fn csv_string(header: Vec<&str>, rows: Vec<Vec<String>>) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for r in rows {
        w.write_record(r)?;
    }
    let bytes = w.into_inner().context("writing CSV")?;
    String::from_utf8(bytes).context("CSV output is not UTF-8")
}

fn json_string(v: &serde_json::Value) -> Result<String> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    Ok(s)
}

/// Renders a list of items.
pub fn render_list<T>(format: Format, cols: &[Column<T>], items: &[T]) -> Result<String> {
    render_list_at(format, cols, items, None)
}

/// [`render_list`], tables `width` columns wide (`None`: the terminal's).
fn render_list_at<T>(format: Format, cols: &[Column<T>], items: &[T], width: Option<u16>) -> Result<String> {
    match format {
        Format::Json => {
            let rows = items
                .iter()
                .map(|i| serde_json::Value::Object(json_object(cols, i)))
                .collect();
            json_string(&serde_json::Value::Array(rows))
        }
        Format::Csv => {
            let cols: Vec<&Column<T>> = cols.iter().filter(|c| !c.summary).collect();
            csv_string(
                cols.iter().map(|c| c.key).collect(),
                items
                    .iter()
                    .map(|i| cols.iter().map(|c| (c.get)(i).to_csv()).collect())
                    .collect(),
            )
        }
        Format::Table | Format::Wide => {
            let wide = format == Format::Wide;
            let shown: Vec<&Column<T>> = cols
                .iter()
                .filter(|c| if wide { !c.summary } else { c.in_table })
                .collect();
            let rows: Vec<Vec<Value>> = items
                .iter()
                .map(|i| shown.iter().map(|c| (c.get)(i)).collect())
                .collect();
            // Per column: how much of its ids tells them apart.
            let id_len: Vec<usize> = (0..shown.len())
                .map(|col| {
                    let ids = rows.iter().filter_map(|r| match &r[col] {
                        Value::Id(id) => Some(id.as_str()),
                        _ => None,
                    });
                    unique_prefix_len(ids, SHORT_ID)
                })
                .collect();
            let mut t = new_table(width);
            t.set_header(shown.iter().map(|c| c.header));
            for row in rows {
                t.add_row(row.iter().zip(&id_len).map(|(v, len)| match v {
                    Value::Id(id) if !wide => short_id(id, *len),
                    v => cell(&v.to_cell(wide)),
                }));
            }
            Ok(finish(t))
        }
    }
}

/// Renders a single item; `only_table_columns` limits a table to the list
/// columns (for short summaries).
pub fn render_one<T>(format: Format, cols: &[Column<T>], item: &T, only_table_columns: bool) -> Result<String> {
    render_one_at(format, cols, item, only_table_columns, None)
}

/// [`render_one`], tables `width` columns wide (`None`: the terminal's).
pub(crate) fn render_one_at<T>(
    format: Format,
    cols: &[Column<T>],
    item: &T,
    only_table_columns: bool,
    width: Option<u16>,
) -> Result<String> {
    match format {
        Format::Json => json_string(&serde_json::Value::Object(json_object(cols, item))),
        Format::Csv => render_list(format, cols, std::slice::from_ref(item)),
        Format::Table | Format::Wide => {
            // One item shows every field, ids and times in full.
            let mut t = new_table(width);
            let shown = cols
                .iter()
                .filter(|c| if only_table_columns { c.in_table } else { !c.summary });
            for c in shown {
                t.add_row(vec![c.header.to_string(), cell(&(c.get)(item).to_cell(true))]);
            }
            Ok(finish(t))
        }
    }
}

/// Renders one item described by two sets of columns (a key and its spend) as one: one JSON
/// object, one CSV row, one field/value table.
pub fn render_pair<A, B>(format: Format, a_cols: &[Column<A>], a: &A, b_cols: &[Column<B>], b: &B) -> Result<String> {
    match format {
        Format::Json => {
            let mut obj = json_object(a_cols, a);
            obj.extend(json_object(b_cols, b));
            json_string(&serde_json::Value::Object(obj))
        }
        Format::Csv => {
            let a_cols: Vec<&Column<A>> = a_cols.iter().filter(|c| !c.summary).collect();
            let b_cols: Vec<&Column<B>> = b_cols.iter().filter(|c| !c.summary).collect();
            let header = a_cols
                .iter()
                .map(|c| c.key)
                .chain(b_cols.iter().map(|c| c.key))
                .collect();
            let row = a_cols
                .iter()
                .map(|c| (c.get)(a).to_csv())
                .chain(b_cols.iter().map(|c| (c.get)(b).to_csv()))
                .collect();
            csv_string(header, vec![row])
        }
        Format::Table | Format::Wide => {
            let mut t = new_table(None);
            for c in a_cols.iter().filter(|c| !c.summary) {
                t.add_row(vec![c.header.to_string(), cell(&(c.get)(a).to_cell(true))]);
            }
            for c in b_cols.iter().filter(|c| !c.summary) {
                t.add_row(vec![c.header.to_string(), cell(&(c.get)(b).to_cell(true))]);
            }
            Ok(finish(t))
        }
    }
}

/// Where command results go (stdout), in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub format: Format,
}

impl Output {
    pub fn new(format: Format) -> Self {
        Output { format }
    }

    fn write(&self, s: &str) -> Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(s.as_bytes())?;
        out.flush()?;
        Ok(())
    }

    /// A list of items.
    pub fn list<T>(&self, cols: &[Column<T>], items: &[T]) -> Result<()> {
        self.write(&render_list(self.format, cols, items)?)
    }

    /// One item, every field.
    pub fn one<T>(&self, cols: &[Column<T>], item: &T) -> Result<()> {
        self.write(&render_one(self.format, cols, item, false)?)
    }

    /// One item described by two sets of columns (see [`render_pair`]).
    pub fn pair<A, B>(&self, a_cols: &[Column<A>], a: &A, b_cols: &[Column<B>], b: &B) -> Result<()> {
        self.write(&render_pair(self.format, a_cols, a, b_cols, b)?)
    }

    /// One item: a sentence in table mode, the item in JSON/CSV.
    pub fn one_or_text<T>(&self, cols: &[Column<T>], item: &T, text: &str) -> Result<()> {
        match self.format {
            Format::Table | Format::Wide => self.write(&format!("{text}\n")),
            _ => self.one(cols, item),
        }
    }

    /// A secret shown once (a new API key or admin token): a summary table and
    /// `<label>: <secret>` with a warning, or the item's fields plus `label` in
    /// JSON/CSV.
    pub fn secret_once<T>(&self, cols: &[Column<T>], item: &T, label: &'static str, secret: &str) -> Result<()> {
        match self.format {
            Format::Table | Format::Wide => {
                let summary = render_one(self.format, cols, item, true)?;
                self.write(&format!("{summary}{label}: {secret}\n"))?;
                eprintln!("warning: the {label} is shown only this once; store it now, relay keeps only a hash of it");
                Ok(())
            }
            Format::Json => {
                let mut obj = json_object(cols, item);
                obj.insert(label.to_string(), serde_json::Value::String(secret.to_string()));
                self.write(&json_string(&serde_json::Value::Object(obj))?)
            }
            Format::Csv => {
                let mut header = vec![label];
                header.extend(cols.iter().map(|c| c.key));
                let mut row = vec![secret.to_string()];
                row.extend(cols.iter().map(|c| (c.get)(item).to_csv()));
                self.write(&csv_string(header, vec![row])?)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Row {
        name: &'static str,
        n: u64,
        at: i64,
        tags: Vec<String>,
        cost: &'static str,
    }

    const COLS: &[Column<Row>] = &[
        Column::new("name", "Name", |r| Value::text(r.name)),
        Column::new("n", "Count", |r| Value::UInt(r.n)),
        Column::detail("at", "At", |r| Value::Time(r.at)),
        Column::new("tags", "Tags", |r| Value::list(&r.tags, "(all)")),
        Column::new("cost_usd", "Cost ($)", |r| Value::Decimal(r.cost.to_string())),
    ];

    fn rows() -> Vec<Row> {
        vec![
            Row {
                name: "a",
                n: 1,
                at: 0,
                tags: vec![],
                cost: "0.003000",
            },
            Row {
                name: "b,c",
                n: 2,
                at: 1_700_000_000_000,
                tags: vec!["x".into(), "y".into()],
                cost: "12.345679",
            },
        ]
    }

    #[test]
    fn json_list() {
        let s = render_list(Format::Json, COLS, &rows()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v[0]["name"], "a");
        assert_eq!(v[0]["at"], serde_json::Value::Null);
        assert_eq!(v[0]["tags"], serde_json::json!([]));
        assert_eq!(v[0]["cost_usd"].as_f64().unwrap(), 0.003);
        assert_eq!(v[1]["at"], "2023-11-14T22:13:20Z");
        assert_eq!(v[1]["n"], 2);
        assert_eq!(v[1]["tags"], serde_json::json!(["x", "y"]));
        assert!(s.contains("12.345679"));
    }

    #[test]
    fn csv_list() {
        let s = render_list(Format::Csv, COLS, &rows()).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "name,n,at,tags,cost_usd");
        assert_eq!(lines[1], "a,1,,,0.003000");
        assert_eq!(lines[2], "\"b,c\",2,2023-11-14T22:13:20Z,x;y,12.345679");
    }

    #[test]
    fn table_list_uses_headers_and_hides_details() {
        let s = render_list(Format::Table, COLS, &rows()).unwrap();
        assert!(s.contains("Name") && s.contains("Cost ($)"));
        assert!(!s.contains("At"));
        assert!(s.contains("(all)") && s.contains("x, y") && s.contains("0.003000"));
    }

    /// UUIDv7s made in the same minute share their first 8 characters: a table shows as many as
    /// tell them apart, never a column of identical ids.
    /// A key stored with 20,000 model patterns (before the Admin API bounded them) made the
    /// table library overflow and relayctl panic: a table cell is bounded, JSON keeps all.
    #[test]
    fn a_huge_cell_is_cut_in_tables_and_whole_in_json() {
        let models: Vec<String> = (0..20_000).map(|i| format!("claude-model-{i:05}")).collect();
        let cols = [Column::new("models", "Models", |m: &Vec<String>| Value::List {
            items: m.clone(),
            empty: "(all)",
        })];
        for width in [Some(80), Some(200), None] {
            let t = render_list_at(Format::Table, &cols, std::slice::from_ref(&models), width).unwrap();
            assert!(t.contains("claude-model-00000"), "{t}");
            assert!(!t.contains("claude-model-19999"));
            assert!(t.contains("more characters; -o json shows all"), "{t}");
            assert!(t.len() < 40_000, "{}", t.len());
            let one = render_one_at(Format::Table, &cols, &models, false, width).unwrap();
            assert!(one.contains("more characters") && one.len() < 40_000);
        }
        let json = render_list(Format::Json, &cols, std::slice::from_ref(&models)).unwrap();
        assert!(json.contains("claude-model-19999"));
    }

    #[test]
    fn control_characters_from_clients_never_reach_the_terminal() {
        assert_eq!(printable("claude-sonnet-4-5"), "claude-sonnet-4-5");
        assert_eq!(
            printable("\u{1b}[2J\u{1b}[31mEVIL\u{7}"),
            "\\u{1b}[2J\\u{1b}[31mEVIL\\u{7}"
        );
        assert_eq!(printable("a\rb\nc"), "a\\u{d}b\nc");
        assert_eq!(printable_line("a\nb"), "a\\u{a}b");
        let model = "\u{1b}[31mEVIL";
        let t = render_list_at(
            Format::Table,
            &[Column::new("model", "Model", |m: &&str| Value::text(m))],
            &[model],
            Some(80),
        )
        .unwrap();
        assert!(!t.contains('\u{1b}') && t.contains("EVIL"), "{t}");
        let one = render_one_at(
            Format::Table,
            &[Column::new("model", "Model", |m: &&str| Value::text(m))],
            &model,
            false,
            Some(80),
        )
        .unwrap();
        assert!(!one.contains('\u{1b}'), "{one}");
    }

    #[test]
    fn short_ids_are_unique_within_a_listing() {
        let ids = [
            "01a240bb-3e84-7348-8e4d-8fdee19ae7ed",
            "01a240bb-3e95-7021-b19b-4e9f2e185be9",
            "01a240bb-3ea3-7328-94af-d68cc5628979",
        ];
        assert_eq!(unique_prefix_len(ids, SHORT_ID), 12);
        assert_eq!(short_id(ids[0], 12), "01a240bb-3e8");
        assert_eq!(short_id(ids[0], 8), "01a240bb");
        // Ids apart by more than a minute keep 8 characters; one id alone too.
        assert_eq!(
            unique_prefix_len(["01a240bb-0000", "01a240cc-0000"], SHORT_ID),
            SHORT_ID
        );
        assert_eq!(unique_prefix_len([ids[0]], SHORT_ID), SHORT_ID);
        // The same millisecond: into the random part.
        assert_eq!(
            unique_prefix_len(
                [
                    "01a240bb-3e84-7348-8e4d-8fdee19ae7ed",
                    "01a240bb-3e84-7349-b19b-4e9f2e185be9"
                ],
                SHORT_ID
            ),
            18
        );

        struct R(&'static str, &'static str);
        const C: &[Column<R>] = &[
            Column::new("name", "Name", |r| Value::text(r.0)),
            Column::new("id", "ID", |r| Value::Id(r.1.to_string())),
        ];
        let rows: Vec<R> = ids.iter().zip(["a", "b", "c"]).map(|(id, n)| R(n, id)).collect();
        let table = render_list(Format::Table, C, &rows).unwrap();
        for short in ["01a240bb-3e8 ", "01a240bb-3e9 ", "01a240bb-3ea "] {
            assert!(table.contains(short), "{table}");
        }
        assert!(!table.contains("7348"), "{table}");
        let wide = render_list(Format::Wide, C, &rows).unwrap();
        assert!(wide.contains(ids[0]), "{wide}");
    }

    /// A summary column ("Prio/Wt") is for list tables only: one item's full view, wide tables,
    /// JSON and CSV show the detail columns it sums up, never both.
    #[test]
    fn a_summary_column_shows_in_list_tables_only() {
        struct R(i64, u64);
        const C: &[Column<R>] = &[
            Column::summary("routing", "Prio/Wt", |r| Value::Text(format!("{}/{}", r.0, r.1))),
            Column::detail("priority", "Priority", |r| Value::Int(r.0)),
            Column::detail("weight", "Weight", |r| Value::UInt(r.1)),
        ];
        let rows = [R(10, 3)];
        let table = render_list(Format::Table, C, &rows).unwrap();
        assert!(table.contains("Prio/Wt") && table.contains("10/3"), "{table}");
        assert!(!table.contains("Priority"), "{table}");
        for (what, out) in [
            ("wide", render_list(Format::Wide, C, &rows).unwrap()),
            ("one", render_one(Format::Table, C, &rows[0], false).unwrap()),
            ("json", render_one(Format::Json, C, &rows[0], false).unwrap()),
            ("csv", render_list(Format::Csv, C, &rows).unwrap()),
            ("pair", render_pair(Format::Table, C, &rows[0], C, &rows[0]).unwrap()),
        ] {
            assert!(
                !out.contains("10/3") && !out.to_lowercase().contains("routing"),
                "{what}: {out}"
            );
            assert!(out.to_lowercase().contains("priority"), "{what}: {out}");
        }
        let short = render_one(Format::Table, C, &rows[0], true).unwrap();
        assert!(short.contains("10/3") && !short.contains("Priority"), "{short}");
    }

    /// In a 100-column terminal cells wrap between words, never inside one (setting names, model
    /// patterns and audit changes were cut mid-word), and the table still fits.
    #[test]
    fn tables_at_100_columns_keep_words_whole() {
        struct R([&'static str; 5]);
        const C: &[Column<R>] = &[
            Column::new("name", "Name", |r| Value::text(r.0[0])),
            Column::new("value", "Value", |r| Value::text(r.0[1])),
            Column::detail("default", "Default", |r| Value::text(r.0[2])),
            Column::new("set", "Set", |r| Value::text(r.0[3])),
            Column::new("changes", "Changes", |r| Value::text(r.0[4])),
        ];
        let rows = vec![
            R([
                "cooldown.rate_limit_default_ms",
                "60000",
                "60000",
                "no",
                "base_url=http://127.0.0.1:9999, credential=set, groups=[\"default\"], kind=anthropic-compatible",
            ]),
            R([
                "headers.expose_ratelimit",
                "org:create_api_key user:profile user:inference",
                "false",
                "yes",
                "group=default, daily budget=$5.00, accounts and keys without an explicit group",
            ]),
            R(["claude-3-5-haiku*", "0.80", "4.00", "no", "-"]),
        ];
        let text = render_list_at(Format::Table, C, &rows, Some(100)).unwrap();
        for line in text.lines() {
            assert!(line.chars().count() <= 100, "wider than 100 columns: {line}\n{text}");
        }
        let words_in_output: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == '│' || c == '┆')
            .filter(|w| !w.is_empty())
            .collect();
        for r in &rows {
            for cell in [r.0[0], r.0[1], r.0[3], r.0[4]] {
                for word in cell.split_whitespace() {
                    assert!(words_in_output.contains(&word), "{word:?} was split:\n{text}");
                }
            }
        }
        // A field/value table too.
        let one = render_one_at(Format::Table, C, &rows[0], false, Some(60)).unwrap();
        assert!(one.contains("cooldown.rate_limit_default_ms"), "{one}");
        assert!(one.contains("groups=[\"default\"],"), "{one}");
    }

    #[test]
    fn empty_structured_values_read_as_a_dash_in_tables() {
        for v in [serde_json::json!(null), serde_json::json!([]), serde_json::json!({})] {
            assert_eq!(Value::Json(v.clone()).to_cell(true), "-", "{v}");
            assert_eq!(Value::Json(v.clone()).to_json(), v, "JSON keeps it");
        }
        assert_eq!(Value::Json(serde_json::json!(["a"])).to_cell(true), "[\"a\"]");
    }

    #[test]
    fn single_item() {
        let r = &rows()[1];
        let s = render_one(Format::Table, COLS, r, false).unwrap();
        assert!(s.contains("At") && s.contains("2023-11-14T22:13:20Z"));
        let s = render_one(Format::Table, COLS, r, true).unwrap();
        assert!(!s.contains("2023-11-14"));
        let v: serde_json::Value = serde_json::from_str(&render_one(Format::Json, COLS, r, false).unwrap()).unwrap();
        assert_eq!(v["name"], "b,c");
    }
}
