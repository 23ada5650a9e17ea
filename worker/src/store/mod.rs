//! Storage: the statements on the bot database (issue 14), moving here one
//! table at a time. The bottom layer: it imports nothing of the pipeline.
//!
//! - [`jobs`]: claims, the lease fence and every fenced write of a running
//!   job ([`jobs::ClaimedJob`]), job creation and `/stop` marks at intake,
//!   the reaper's queries, and [`jobs::load`] of a job with its chat.
//! - [`updates`]: `processed_updates` (dedup of Telegram updates).
//! - [`conversation`]: `messages`, the stored conversation of each chat.
//! - [`calls`]: `api_calls` and `tool_calls`.
//! - [`rounds`]: `job_rounds`, a running job's completed tool rounds.
//! - [`outbox`]: `billing_outbox`, written with what it charges for, and relayed.
//! - [`pacing`]: `telegram_pacing`, the Bot API slots shared by every host.
//! - [`documents`]: `documents`, the files users sent, and their quota.
//! - [`notes`]: `user_notes`, the `remember` tool's notes.
//! - [`chats`]: `users` and `chats`, and a group's move to a supergroup.
//! - [`payments`]: `payment_anomalies`, payments that credited nothing.
//!
//! The billing database is not here: its statements belong to the billing
//! crate (issue 14, slice 3).

/// A value read from a TEXT column that is not one of its enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {column} {value:?}")]
pub struct UnknownValue {
    /// The column (`jobs.status`, …).
    pub column: &'static str,
    /// What was read.
    pub value: String,
}

/// An enum stored as TEXT: `as_str`, `Display`, `FromStr`, and sqlx
/// encode/decode as PostgreSQL `text` (an unknown value fails the decode
/// with [`UnknownValue`], never silently).
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident in $column:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The value as stored in the column.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::store::UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok(Self::$variant), )+
                    other => Err($crate::store::UnknownValue { column: $column, value: other.to_owned() }),
                }
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?.parse()?)
            }
        }
    };
}

pub mod calls;
pub mod chats;
pub mod conversation;
pub mod documents;
pub mod jobs;
pub mod notes;
pub mod outbox;
pub mod pacing;
pub mod payments;
pub mod rounds;
pub mod updates;

/// The values of the last `CHECK (<column> IN (…))` of the bot
/// migrations, in order: the constraint as the database has it (the enums'
/// tests compare their values with it).
#[cfg(test)]
pub(crate) fn check_list(column: &str) -> Vec<String> {
    let migrator = sqlx::migrate!("../migrations/bot");
    let schema: String = migrator.iter().map(|m| m.sql.to_string()).collect::<Vec<_>>().join("\n");
    let opening = format!("CHECK ({column} IN (");
    let Some(start) = schema.rfind(&opening) else { panic!("no {opening} in the bot migrations") };
    let list = &schema[start + opening.len()..];
    let Some(end) = list.find(')') else { panic!("{opening} is not closed") };
    list[..end].split(',').map(|v| v.trim().trim_matches('\'').to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Where `source` (the file `file`) runs SQL outside `store/`: the text
    /// of each statement from its `sqlx::query…`/`sqlx::raw_sql` up to its
    /// `.await`, or the import line that would let it write one unprefixed.
    fn statements_outside_store(file: &str, source: &str) -> Vec<String> {
        let mut found = Vec::new();
        for needle in ["sqlx::query", "sqlx::raw_sql"] {
            for (at, _) in source.match_indices(needle) {
                let rest = &source[at..];
                let end = rest.find(".await").map_or(rest.len(), |e| e + ".await".len());
                let statement = &rest[..end];
                found.push(format!("{file}: {}", statement.lines().next().unwrap_or_default()));
            }
        }
        for line in source.lines() {
            let line = line.trim();
            if line.starts_with("use sqlx::{") && (line.contains("query") || line.contains("raw_sql")) {
                found.push(format!("{file}: {line}"));
            }
        }
        found
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                rust_files(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
        Ok(())
    }

    #[test]
    fn no_worker_file_outside_store_runs_sql_on_the_bot_database() -> std::io::Result<()> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let store = src.join("store");
        let mut files = Vec::new();
        rust_files(&src, &mut files)?;
        assert!(files.len() > 20, "worker/src was not found: {}", src.display());
        let mut found = Vec::new();
        for path in files.iter().filter(|p| !p.starts_with(&store)) {
            let name = path.strip_prefix(&src).unwrap_or(path).to_string_lossy().replace('\\', "/");
            found.extend(statements_outside_store(&name, &std::fs::read_to_string(path)?));
        }
        assert!(found.is_empty(), "SQL outside worker/src/store/ (move it into a store module):\n{}", found.join("\n"));
        Ok(())
    }

    #[test]
    fn the_scan_sees_a_query_and_an_import() {
        let bot = "let n: i64 = sqlx::query_scalar(\"SELECT 1\").fetch_one(&ctx.db).await?;";
        assert_eq!(statements_outside_store("job/mod.rs", bot).len(), 1);
        assert_eq!(statements_outside_store("x.rs", "use sqlx::{query_as, PgPool};").len(), 1);
        // The billing database is the billing crate's: no statement on it is let through either.
        // (Spelled in pieces so the billing crate's own scan does not find it here.)
        let billing =
            concat!("sqlx::query(\"SELECT fleet_", "void_hold($1)\").bind(id).execute(&ctx.billing", "_db).await");
        assert_eq!(statements_outside_store("holds.rs", billing).len(), 1);
    }
}
