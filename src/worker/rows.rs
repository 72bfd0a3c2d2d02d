//! The rows of a statement the worker ran through SPI, read the cheap way:
//! each row's columns taken apart in one pass, each value converted
//! directly.
//!
//! Why not pgrx's `SpiHeapTupleData`: it reads every column with
//! `SPI_getbinval`, which walks the tuple from its start for each column
//! after the first of variable width, asks each column's type again, and
//! converts each value under a type check and a switch of memory context,
//! with a vector per row. The event reads return eleven columns, six of
//! them text: in a batched drain, where the main thread is what limits
//! the rate, that was about a tenth of its time.

use pgrx::datum::{FromDatum, TryFromDatumError};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::spi::{SpiError, SpiErrorCodes, SpiResult, SpiTupleTable};
use pgrx::varlena;

// `bigint`, `double precision` and `timestamptz` are read from the Datum
// itself: passed by value, as on every 64-bit build of Postgres 13-17.
const _: () = assert!(std::mem::size_of::<Datum>() == 8);

/// One row: its values and nulls, by column (0-based here, 1-based in
/// the getters, as in SQL and pgrx), and the columns' types.
pub struct Row {
    types: Vec<Oid>,
    values: Vec<Datum>,
    nulls: Vec<bool>,
}

/// `f` of each row of `table`, which must be the result of the statement
/// SPI ran last: what `SpiClient::update` returned, passed straight in.
pub fn each<R>(table: SpiTupleTable<'_>, mut f: impl FnMut(&Row) -> SpiResult<R>) -> SpiResult<Vec<R>> {
    if table.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: `table` wraps SPI's result of the statement it ran last
    // (pgrx takes it from `SPI_tuptable` right after running it), and the
    // callers pass it straight in: no statement runs in between, nor in
    // `f` (a result of another shape is refused below). That result, its
    // descriptor and its `numvals` tuples live until SPI finishes. Each
    // tuple is taken apart into `natts` values and nulls, the lengths of
    // `row`'s vectors.
    unsafe {
        let result = pg_sys::SPI_tuptable;
        if result.is_null() || (*result).numvals as usize != table.len() || (*result).tupdesc.is_null() {
            return Err(SpiError::NoTupleTable);
        }
        let tupdesc = (*result).tupdesc;
        let natts = (*tupdesc).natts.max(0) as usize;
        let types: Vec<Oid> = (1..=natts as i32).map(|i| pg_sys::SPI_gettypeid(tupdesc, i)).collect();
        // The same shape as `table` says it has (the pointer itself is
        // pgrx's to keep): a statement run in between would show here.
        if table.columns()? != natts
            || types.iter().enumerate().any(|(i, t)| table.column_type_oid(i + 1).map(|o| o.value()) != Ok(*t))
        {
            return Err(SpiError::NoTupleTable);
        }
        let mut row = Row { types, values: vec![Datum::from(0usize); natts], nulls: vec![true; natts] };
        let tuples = std::slice::from_raw_parts((*result).vals, table.len());
        let mut out = Vec::with_capacity(tuples.len());
        for &tuple in tuples {
            pg_sys::heap_deform_tuple(tuple, tupdesc, row.values.as_mut_ptr(), row.nulls.as_mut_ptr());
            out.push(f(&row)?);
        }
        Ok(out)
    }
}

impl Row {
    /// Column `col`'s value (1-based), None when NULL, if its type is
    /// `want` (the reads are the worker's own: a mismatch is a bug, an
    /// error rather than a wrong value).
    fn datum(&self, col: usize, want: Oid, rust_type: &'static str) -> SpiResult<Option<Datum>> {
        let i = col.checked_sub(1).filter(|i| *i < self.values.len());
        let Some(i) = i else { return Err(SpiError::SpiError(SpiErrorCodes::NoAttribute)) };
        if self.types[i] != want {
            return Err(SpiError::DatumError(TryFromDatumError::IncompatibleTypes {
                rust_type,
                rust_oid: want,
                datum_type: format!("{:?}", self.types[i]),
                datum_oid: self.types[i],
            }));
        }
        Ok((!self.nulls[i]).then_some(self.values[i]))
    }

    /// A `bigint` column.
    pub fn i64(&self, col: usize) -> SpiResult<Option<i64>> {
        Ok(self.datum(col, pg_sys::INT8OID, "i64")?.map(|d| d.value() as i64))
    }

    /// An `integer` column.
    pub fn i32(&self, col: usize) -> SpiResult<Option<i32>> {
        Ok(self.datum(col, pg_sys::INT4OID, "i32")?.map(|d| d.value() as i32))
    }

    /// A `boolean` column.
    pub fn bool(&self, col: usize) -> SpiResult<Option<bool>> {
        Ok(self.datum(col, pg_sys::BOOLOID, "bool")?.map(|d| d.value() != 0))
    }

    /// A `double precision` column.
    pub fn f64(&self, col: usize) -> SpiResult<Option<f64>> {
        Ok(self.datum(col, pg_sys::FLOAT8OID, "f64")?.map(|d| f64::from_bits(d.value() as u64)))
    }

    /// A `timestamptz` column: microseconds since 2000-01-01 UTC.
    pub fn timestamptz(&self, col: usize) -> SpiResult<Option<i64>> {
        Ok(self.datum(col, pg_sys::TIMESTAMPTZOID, "timestamptz")?.map(|d| d.value() as i64))
    }

    /// A `text` column, copied. A value stored in the row itself, in UTF-8
    /// (all the computed ones: ids, payloads, headers), is copied from
    /// there; one compressed or stored apart (a long key, say), or not
    /// UTF-8, goes through pgrx's conversion, which detoasts it.
    pub fn text(&self, col: usize) -> SpiResult<Option<String>> {
        let Some(datum) = self.datum(col, pg_sys::TEXTOID, "String")? else { return Ok(None) };
        let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        // SAFETY: a non-null text datum of a row SPI still holds; its
        // header says whether its bytes are all here (not external, not
        // compressed), and then how many there are.
        unsafe {
            if !varlena::varatt_is_1b_e(ptr) && !varlena::varatt_is_4b_c(ptr) {
                let bytes = varlena::varlena_to_byte_slice(ptr);
                let usable = match database_encoding() {
                    // Used when they are UTF-8, as pgrx uses them.
                    Encoding::Utf8 => std::str::from_utf8(bytes).ok(),
                    // Another encoding: only ASCII reads the same in UTF-8
                    // (pgrx refuses the rest, as the fallback still does).
                    Encoding::Other => bytes.is_ascii().then(|| std::str::from_utf8_unchecked(bytes)),
                };
                if let Some(text) = usable {
                    return Ok(Some(text.to_owned()));
                }
            }
            Ok(String::from_polymorphic_datum(datum, false, pg_sys::TEXTOID))
        }
    }
}

/// What the database's encoding means for reading text as UTF-8.
#[derive(Clone, Copy)]
enum Encoding {
    /// UTF-8 (Postgres checked the bytes), or SQL_ASCII (bytes as
    /// written, taken when they are UTF-8).
    Utf8,
    /// Another encoding: one that extends ASCII.
    Other,
}

fn database_encoding() -> Encoding {
    thread_local! {
        // SAFETY: the database's encoding is set once the worker has
        // connected, before any read, and never changes.
        static ENCODING: Encoding = match unsafe { pg_sys::GetDatabaseEncoding() } as u32 {
            pg_sys::pg_enc::PG_UTF8 | pg_sys::pg_enc::PG_SQL_ASCII => Encoding::Utf8,
            _ => Encoding::Other,
        };
    }
    ENCODING.with(|e| *e)
}
