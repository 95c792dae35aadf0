//! Every query and mutation the two services send, each a function that builds an [`Operation`].
//!
//! Documents are constants assembled from the shared selection sets below, so a column added to
//! a row type is added in one place. Conventions that keep them valid on both Hasura and the
//! local engine: `_and`/`_or` are always lists, list variables are declared nullable
//! (`[String!]`), and filters on several columns are written as one object (an implicit AND).
//!
//! [`Operation`]: crate::Operation

pub mod assign;
pub mod config;
pub mod images;
pub mod instances;
pub mod mandelboxes;
pub mod scaling;

pub use self::assign::*;
pub use self::config::*;
pub use self::images::*;
pub use self::instances::*;
pub use self::mandelboxes::*;
pub use self::scaling::*;

/// The columns of `whist.instances`, in table order.
macro_rules! instance_fields {
    () => {
        "id provider region image_id client_sha ip_addr instance_type remaining_capacity status created_at updated_at fleet heartbeat_at tls_fingerprint"
    };
}

/// The columns of `whist.mandelboxes`, in table order.
macro_rules! mandelbox_fields {
    () => {
        "id app instance_id user_id session_id status created_at updated_at"
    };
}

/// The columns of `whist.images`, in table order.
macro_rules! image_fields {
    () => {
        "provider region image_id client_sha updated_at"
    };
}

pub(crate) use {image_fields, instance_fields, mandelbox_fields};

#[cfg(test)]
pub(crate) mod testing {
    //! Checks every document must pass: balanced braces, declared variables all used and all
    //! supplied, and no single-object `_and`/`_or`.

    use crate::Operation;

    pub(crate) fn assert_well_formed<T>(operation: &Operation<T>) {
        let document = operation.document();
        let name = operation.name();
        assert_eq!(
            document.matches('{').count(),
            document.matches('}').count(),
            "{name}: unbalanced braces"
        );
        assert!(
            document.contains(&format!(" {name}")),
            "{name}: the document must carry the operation's name"
        );
        assert!(
            !document.contains("_and: {") && !document.contains("_or: {"),
            "{name}: _and/_or must be lists"
        );
        let declared = declared_variables(document);
        let supplied = operation
            .variables()
            .as_object()
            .map(|object| object.len())
            .unwrap_or(0);
        for variable in &declared {
            assert!(
                document.matches(&format!("${variable}")).count() >= 2,
                "{name}: ${variable} is declared but not used"
            );
            assert!(
                operation.variables().get(variable).is_some(),
                "{name}: ${variable} is declared but not supplied"
            );
        }
        assert_eq!(
            declared.len(),
            supplied,
            "{name}: supplied variables that are not declared"
        );
    }

    fn declared_variables(document: &str) -> Vec<String> {
        let Some(start) = document.find('(') else {
            return Vec::new();
        };
        let Some(end) = document[start..].find(')') else {
            return Vec::new();
        };
        let header = &document[start..start + end];
        if !header.contains('$') || document[..start].contains('{') {
            return Vec::new();
        }
        header
            .split('$')
            .skip(1)
            .filter_map(|part| part.split(':').next())
            .map(|name| name.trim().to_owned())
            .collect()
    }
}
