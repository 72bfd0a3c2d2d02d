//! The SQL-facing error type: what a caller of the extension's functions
//! sees. Lower layers have their own errors (config::ConfigError, ...) and
//! convert into this one at the SQL boundary.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

#[derive(Debug)]
pub struct SqlError {
    code: PgSqlErrorCode,
    message: String,
    hint: Option<String>,
}

impl SqlError {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>) -> Self {
        SqlError { code, message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Raise as an SQL ERROR: aborts the statement, never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.code, self.message, "outbox");
        if let Some(hint) = self.hint {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl From<crate::config::ConfigError> for SqlError {
    fn from(e: crate::config::ConfigError) -> Self {
        let mut err = SqlError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.message);
        if let Some(hint) = e.hint {
            err = err.hint(hint);
        }
        err
    }
}

pub trait OrRaise<T> {
    /// Unwrap, or raise the error as an SQL ERROR.
    fn or_raise(self) -> T;
}

impl<T, E: Into<SqlError>> OrRaise<T> for Result<T, E> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.into().raise())
    }
}
