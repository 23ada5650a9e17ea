//! How the finance commands write their results: the closed set of formats
//! (`--format table|csv|json`; clap refuses anything else with exit 2) and
//! CSV through the `csv` crate (RFC 4180 quoting: a header row, one column
//! per field, nothing else). Money is written by
//! [`shared::money::format_amount`] (CSV, JSON strings) and
//! [`shared::money::format_usd`] (tables): two decimals at least, never
//! rounded.

/// Output format of `reconcile`, `statement` and `dead-letters list`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people, with totals.
    #[default]
    Table,
    /// CSV: a header row, then one record per row; no summary lines.
    Csv,
    /// One JSON document (pretty-printed), with totals.
    Json,
}

/// CSV text of `header` and `rows` (each as long as the header).
///
/// # Errors
/// A row whose length differs from the header's (the `csv` writer refuses
/// it); never for the text itself (any cell is quoted as needed).
pub fn csv_text<R, C>(header: &[&str], rows: R) -> anyhow::Result<String>
where
    R: IntoIterator<Item = Vec<C>>,
    C: AsRef<[u8]>,
{
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)?;
    for row in rows {
        w.write_record(row)?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("writing CSV: {}", e.error()))?;
    Ok(String::from_utf8(bytes)?)
}

/// Pretty JSON text of `value`.
///
/// # Errors
/// Serialization errors (none for a `serde_json::Value`).
pub fn json_text(value: &serde_json::Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

/// An optional value as a CSV cell: empty when absent.
pub fn cell<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}
