//! rusqlite failures as typed store errors: a busy or locked database, or one that cannot be
//! opened or written to disk, is `Unavailable`; a value that does not convert is `Corrupt`;
//! anything else `Internal`; each keeps rusqlite's error as its source. Also the column
//! conversions the row mappers use.

use crate::model::*;
use crate::store::{Result, StoreError};
use rusqlite::types::{Type, Value};
use rusqlite::{ffi, Row};
use std::str::FromStr;

/// A rusqlite error, by kind (see the module doc).
pub(crate) fn db(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    let message = e.to_string();
    match &e {
        rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..) => StoreError::corrupt_from(message, e),
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                C::DatabaseBusy | C::DatabaseLocked | C::CannotOpen | C::SystemIoFailure | C::DiskFull | C::OutOfMemory
            ) =>
        {
            StoreError::unavailable(message, e)
        }
        _ => StoreError::internal(message, e),
    }
}

/// The extended constraint code when `e` is a constraint violation.
pub(super) fn constraint_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ffi::ErrorCode::ConstraintViolation => Some(f.extended_code),
        _ => None,
    }
}

pub(super) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        constraint_code(e),
        Some(ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    )
}

pub(super) fn rev_from_db(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::corrupt(format!("negative revision {v}")))
}

pub(super) fn col_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

pub(super) fn col_u32(row: &Row<'_>, idx: usize) -> rusqlite::Result<u32> {
    let v: i64 = row.get(idx)?;
    u32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

pub(super) fn col_i32(row: &Row<'_>, idx: usize) -> rusqlite::Result<i32> {
    let v: i64 = row.get(idx)?;
    i32::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v))
}

pub(super) fn col_opt_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = row.get(idx)?;
    v.map(|v| u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(idx, v)))
        .transpose()
}

pub(super) fn col_parse<T: FromStr<Err = String>>(row: &Row<'_>, idx: usize) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    s.parse()
        .map_err(|e: String| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, e.into()))
}

pub(super) fn col_version(row: &Row<'_>, epoch: usize, revision: usize) -> rusqlite::Result<Option<Version>> {
    match (col_opt_u64(row, epoch)?, col_opt_u64(row, revision)?) {
        (Some(epoch), Some(revision)) => Ok(Some(Version { epoch, revision })),
        _ => Ok(None),
    }
}

pub(super) fn opt_i64(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::Integer)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::db;
    use crate::store::StoreError;
    use rusqlite::ffi;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), Some("detail".into()))
    }

    /// A busy, locked or unwritable database is worth a retry; a bad statement is not; a value
    /// that does not convert is corrupt data. Each keeps rusqlite's error as its source.
    #[test]
    fn errors_are_sorted_by_what_a_caller_can_do() {
        for code in [
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_CANTOPEN,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_FULL,
        ] {
            let e = db(failure(code));
            assert!(matches!(e, StoreError::Unavailable { .. }), "{code}: {e:?}");
            assert!(std::error::Error::source(&e).is_some());
        }
        let e = db(failure(ffi::SQLITE_ERROR));
        assert!(matches!(e, StoreError::Internal { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
        let e = db(rusqlite::Error::IntegralValueOutOfRange(3, -1));
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().starts_with("stored data is invalid: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
