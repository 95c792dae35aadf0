//! GraphQL operations as plain values: a document, its variables, and how to read the answer.
//!
//! Building an operation does no I/O, so every document and variable set is unit-tested on its
//! own; [`crate::HasuraClient`] only sends operations and decodes answers.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::DbError;

type Decoder<T> = Box<dyn Fn(Value) -> Result<T, String> + Send + Sync>;

/// One GraphQL request and the decoder for its `data`.
pub struct Operation<T> {
    name: &'static str,
    document: &'static str,
    variables: Value,
    decode: Decoder<T>,
}

impl<T> std::fmt::Debug for Operation<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operation")
            .field("name", &self.name)
            .field("variables", &self.variables)
            .finish_non_exhaustive()
    }
}

impl<T> Operation<T> {
    pub fn new(
        name: &'static str,
        document: &'static str,
        variables: Value,
        decode: impl Fn(Value) -> Result<T, String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            document,
            variables,
            decode: Box::new(decode),
        }
    }

    /// The operation name, also used in errors and logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn document(&self) -> &'static str {
        self.document
    }

    pub fn variables(&self) -> &Value {
        &self.variables
    }

    /// The JSON body of the HTTP request (or the `subscribe` payload on a websocket).
    pub fn request_body(&self) -> Value {
        serde_json::json!({
            "query": self.document,
            "variables": self.variables,
            "operationName": self.name,
        })
    }

    /// Reads the `data` member of a successful answer.
    pub fn decode(&self, data: Value) -> Result<T, DbError> {
        (self.decode)(data).map_err(|message| DbError::Decode {
            operation: self.name,
            message,
        })
    }
}

/// Takes `data.<field>` out of an answer.
pub(crate) fn take_field(mut data: Value, field: &str) -> Result<Value, String> {
    match data.get_mut(field) {
        Some(value) => Ok(value.take()),
        None => Err(format!("answer has no field {field:?}")),
    }
}

/// Decodes `data.<field>` as `D`.
pub(crate) fn field<D: DeserializeOwned>(
    field: &'static str,
) -> impl Fn(Value) -> Result<D, String> {
    move |data| {
        let value = take_field(data, field)?;
        serde_json::from_value(value).map_err(|error| format!("{field}: {error}"))
    }
}

/// Decodes `data.<field>.affected_rows`.
pub(crate) fn affected_rows(field: &'static str) -> impl Fn(Value) -> Result<u64, String> {
    move |data| {
        let result = take_field(data, field)?;
        result
            .get("affected_rows")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("{field}: no affected_rows"))
    }
}

/// Decodes the single row of `data.<field>.returning`, or `None` when nothing matched.
pub(crate) fn returning_one<D: DeserializeOwned>(
    field: &'static str,
) -> impl Fn(Value) -> Result<Option<D>, String> {
    move |data| {
        let mut result = take_field(data, field)?;
        let returning =
            take_field(result.take(), "returning").map_err(|error| format!("{field}: {error}"))?;
        let mut rows: Vec<D> =
            serde_json::from_value(returning).map_err(|error| format!("{field}: {error}"))?;
        match rows.len() {
            0 | 1 => Ok(rows.pop()),
            n => Err(format!("{field}: expected at most one row, got {n}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn field_decoding_reports_what_is_missing() {
        let decode = field::<Vec<i32>>("things");
        assert_eq!(decode(json!({"things": [1, 2]})), Ok(vec![1, 2]));
        assert!(
            decode(json!({"other": []}))
                .expect_err("missing")
                .contains("things")
        );
        assert!(decode(json!({"things": "x"})).is_err());
    }

    #[test]
    fn returning_one_refuses_several_rows() {
        let decode = returning_one::<i32>("update");
        assert_eq!(decode(json!({"update": {"returning": []}})), Ok(None));
        assert_eq!(decode(json!({"update": {"returning": [7]}})), Ok(Some(7)));
        assert!(decode(json!({"update": {"returning": [1, 2]}})).is_err());
    }

    #[test]
    fn affected_rows_must_be_a_count() {
        let decode = affected_rows("delete");
        assert_eq!(decode(json!({"delete": {"affected_rows": 3}})), Ok(3));
        assert!(decode(json!({"delete": {"affected_rows": "3"}})).is_err());
    }
}
