//! GraphQL operations as plain values: a document, its variables, and how to read the answer.
//!
//! Building an operation does no I/O, so every document and variable set is unit-tested on its
//! own; [`crate::HasuraClient`] only sends operations and decodes answers.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::DbError;

type Decoder<T> = Box<dyn Fn(Value) -> Result<T, String> + Send + Sync>;

/// One GraphQL request and the decoder for its `data`.
pub struct Operation<T> {
    name: &'static str,
    document: Cow<'static, str>,
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
            document: Cow::Borrowed(document),
            variables,
            decode: Box::new(decode),
        }
    }

    /// The operation name, also used in errors and logs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn document(&self) -> &str {
        &self.document
    }

    /// This mutation, made to land only while `fence` still holds its lease: the fence's check
    /// becomes the first root field, and the engine runs a mutation's root fields in order in
    /// one transaction, so a refused check (`DbError::Fenced`) rolls the whole write back.
    ///
    /// # Panics
    /// When the document is not a mutation (a programming error: only writes are fenced).
    pub fn fenced(mut self, fence: &Fence) -> Self {
        const VARIABLES: &str = fence_variables!();
        const CHECK: &str = concat!(fence_check!(), " ");
        let document = self.document.as_ref();
        assert!(
            document.starts_with("mutation "),
            "{}: only mutations are fenced",
            self.name
        );
        let body = document.find('{').expect("a mutation has a selection set");
        let fenced = match document[..body].find('(') {
            Some(open) => format!(
                "{}{VARIABLES}, {}{{ {CHECK}{}",
                &document[..=open],
                &document[open + 1..body],
                document[body + 1..].trim_start()
            ),
            None => format!(
                "{}({VARIABLES}) {{ {CHECK}{}",
                document[..body].trim_end(),
                document[body + 1..].trim_start()
            ),
        };
        self.document = Cow::Owned(fenced);
        if let Some(variables) = self.variables.as_object_mut() {
            variables.extend(fence.variables());
        }
        self
    }

    pub fn variables(&self) -> &Value {
        &self.variables
    }

    /// The JSON body of the HTTP request (or the `subscribe` payload on a websocket).
    pub fn request_body(&self) -> Value {
        serde_json::json!({
            "query": self.document.as_ref(),
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

/// A leader's right to write: the lease it holds, as whom, and the generation the database gave
/// its term. Writes made with [`Operation::fenced`] land only while all three still hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub lease: String,
    pub holder: String,
    pub generation: i64,
}

impl Fence {
    /// The variables [`fence_variables`] declares.
    pub(crate) fn variables(&self) -> serde_json::Map<String, Value> {
        serde_json::Map::from_iter([
            ("fence_lease".to_owned(), self.lease.clone().into()),
            ("fence_holder".to_owned(), self.holder.clone().into()),
            ("fence_generation".to_owned(), self.generation.into()),
        ])
    }
}

/// The variable declarations of the fence's check.
macro_rules! fence_variables {
    () => {
        "$fence_lease: String!, $fence_holder: String!, $fence_generation: bigint!"
    };
}

/// The fence's check as a root field: the trigger on `config.lease_fences` refuses it, and so
/// the whole mutation, unless the generation still holds the lease.
macro_rules! fence_check {
    () => {
        "fence: insert_config_lease_fences(objects: [{name: $fence_lease, holder: $fence_holder, generation: $fence_generation}]) { affected_rows }"
    };
}

pub(crate) use {fence_check, fence_variables};

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

    fn fence() -> Fence {
        Fence {
            lease: "scaling".into(),
            holder: "replica-a".into(),
            generation: 7,
        }
    }

    #[test]
    fn a_fenced_mutation_checks_its_lease_first() {
        let operation = Operation::new(
            "DrainIt",
            "mutation DrainIt($id: String!) { update_x(where: {id: {_eq: $id}}) { affected_rows } }",
            json!({"id": "i-1"}),
            affected_rows("update_x"),
        )
        .fenced(&fence());
        assert_eq!(
            operation.document(),
            "mutation DrainIt($fence_lease: String!, $fence_holder: String!, $fence_generation: bigint!, $id: String!) { fence: insert_config_lease_fences(objects: [{name: $fence_lease, holder: $fence_holder, generation: $fence_generation}]) { affected_rows } update_x(where: {id: {_eq: $id}}) { affected_rows } }"
        );
        assert_eq!(
            operation.variables(),
            &json!({"id": "i-1", "fence_lease": "scaling", "fence_holder": "replica-a", "fence_generation": 7})
        );
        crate::ops::testing::assert_well_formed(&operation);
        // The decoder still reads its own field; the fence's answer is ignored.
        let rows = operation
            .decode(json!({"fence": {"affected_rows": 0}, "update_x": {"affected_rows": 1}}))
            .expect("decodes");
        assert_eq!(rows, 1);
    }

    #[test]
    fn a_mutation_without_variables_gets_the_fence_variables() {
        let operation = Operation::new(
            "Touch",
            "mutation Touch { update_x(where: {}) { affected_rows } }",
            json!({}),
            affected_rows("update_x"),
        )
        .fenced(&fence());
        assert!(
            operation
                .document()
                .starts_with("mutation Touch($fence_lease: String!, $fence_holder: String!, $fence_generation: bigint!) { fence: ")
        );
        crate::ops::testing::assert_well_formed(&operation);
    }

    #[test]
    #[should_panic(expected = "only mutations are fenced")]
    fn queries_are_not_fenced() {
        let _ = Operation::new("Q", "query Q { x { id } }", json!({}), |_| Ok(())).fenced(&fence());
    }
}
