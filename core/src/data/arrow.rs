//! Rows of a Hugging Face `save_to_disk` table: an Arrow IPC stream, read into JSON values so
//! that task loaders pick fields by name and report a missing or mistyped one by name.

use std::path::Path;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Int8Type, Int16Type, Int32Type, Int64Type};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub type Row = Map<String, Value>;

/// Every row of the Arrow IPC stream at `path`.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |what: String| Error::format(path, what);
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
        .map_err(|e| bad(format!("not an Arrow IPC stream: {e}")))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("corrupt record batch: {e}")))?;
        let schema = batch.schema();
        let start = rows.len();
        rows.resize(start + batch.num_rows(), Row::new());
        for (field, col) in schema.fields().iter().zip(batch.columns()) {
            for (i, row) in rows[start..].iter_mut().enumerate() {
                let v = cell(col.as_ref(), i).ok_or_else(|| {
                    bad(format!(
                        "column '{}' has an unsupported type {}",
                        field.name(),
                        field.data_type()
                    ))
                })?;
                row.insert(field.name().clone(), v);
            }
        }
    }
    Ok(rows)
}

/// One cell as JSON: strings, booleans, integers and lists of them; None for other types.
fn cell(col: &dyn Array, i: usize) -> Option<Value> {
    if col.is_null(i) {
        return Some(Value::Null);
    }
    if let Some(a) = col.as_string_opt::<i32>() {
        return Some(a.value(i).into());
    }
    if let Some(a) = col.as_string_opt::<i64>() {
        return Some(a.value(i).into());
    }
    if let Some(a) = col.as_boolean_opt() {
        return Some(a.value(i).into());
    }
    if let Some(a) = col.as_primitive_opt::<Int64Type>() {
        return Some(a.value(i).into());
    }
    if let Some(a) = col.as_primitive_opt::<Int32Type>() {
        return Some(a.value(i).into());
    }
    if let Some(a) = col.as_primitive_opt::<Int16Type>() {
        return Some(a.value(i).into());
    }
    if let Some(a) = col.as_primitive_opt::<Int8Type>() {
        return Some(a.value(i).into());
    }
    if let Some(a) = col.as_list_opt::<i32>() {
        let v = a.value(i);
        return (0..v.len()).map(|j| cell(v.as_ref(), j)).collect();
    }
    None
}
