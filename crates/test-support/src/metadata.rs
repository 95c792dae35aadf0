//! Reads the Hasura metadata the project ships (`deploy/hasura/metadata`) so that the local
//! engine exposes exactly what Hasura would: the same tables, relationship names and custom
//! names.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;

/// One tracked table, as its metadata file describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct TrackedTable {
    pub table: TableName,
    #[serde(default)]
    pub configuration: Option<TableConfiguration>,
    #[serde(default)]
    pub object_relationships: Vec<Relationship>,
    #[serde(default)]
    pub array_relationships: Vec<Relationship>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TableName {
    pub name: String,
    pub schema: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TableConfiguration {
    #[serde(default)]
    pub custom_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Relationship {
    pub name: String,
    pub using: RelationshipUsing,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RelationshipUsing {
    pub foreign_key_constraint_on: ForeignKeyOn,
}

/// An object relationship names its own column; an array relationship names the remote table
/// and its column.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ForeignKeyOn {
    Column(String),
    Remote { column: String, table: TableName },
}

impl TrackedTable {
    /// `schema.table`
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.table.schema, self.table.name)
    }

    /// Relationship names keyed by the foreign-key constraint behind them (Postgres's default
    /// constraint name, which the migrations also use).
    fn relationships_by_constraint(&self) -> BTreeMap<String, String> {
        self.object_relationships
            .iter()
            .chain(&self.array_relationships)
            .map(|relationship| {
                let constraint = match &relationship.using.foreign_key_constraint_on {
                    ForeignKeyOn::Column(column) => format!("{}_{column}_fkey", self.table.name),
                    ForeignKeyOn::Remote { column, table } => {
                        format!("{}_{column}_fkey", table.name)
                    }
                };
                (constraint, relationship.name.clone())
            })
            .collect()
    }
}

/// Every table the metadata tracks, following `tables.yaml`'s `!include`s.
pub fn tracked_tables(metadata_dir: &Path) -> anyhow::Result<Vec<TrackedTable>> {
    let tables_dir = metadata_dir.join("databases/default/tables");
    let index_path = tables_dir.join("tables.yaml");
    let index: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(&index_path)
            .with_context(|| format!("read {}", index_path.display()))?,
    )
    .with_context(|| format!("parse {}", index_path.display()))?;
    let serde_yaml::Value::Sequence(entries) = index else {
        bail!("{} must be a list", index_path.display());
    };
    entries
        .into_iter()
        .map(|entry| match include_target(&entry) {
            Some(file) => {
                let path = tables_dir.join(file);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("read {}", path.display()))?;
                serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))
            }
            None => serde_yaml::from_value(entry).context("parse an inline table entry"),
        })
        .collect()
}

/// The file an `!include` entry names. Hasura's CLI writes them as quoted strings
/// (`- "!include whist_instances.yaml"`); an unquoted YAML tag is accepted too.
fn include_target(entry: &serde_yaml::Value) -> Option<String> {
    match entry {
        serde_yaml::Value::String(text) => text
            .strip_prefix("!include ")
            .map(|file| file.trim().to_owned()),
        serde_yaml::Value::Tagged(tagged) if tagged.tag == "!include" => {
            tagged.value.as_str().map(str::to_owned)
        }
        _ => None,
    }
}

/// The engine's `PGRST_GRAPHQL_NAMES` document: custom names and relationship names from the
/// metadata, so the engine answers under Hasura's names.
pub fn engine_names_json(tables: &[TrackedTable]) -> String {
    let mut document = serde_json::Map::new();
    for table in tables {
        let mut entry = serde_json::Map::new();
        if let Some(name) = table
            .configuration
            .as_ref()
            .and_then(|c| c.custom_name.clone())
        {
            entry.insert("name".into(), json!(name));
        }
        let relationships = table.relationships_by_constraint();
        if !relationships.is_empty() {
            entry.insert("relationships".into(), json!(relationships));
        }
        if !entry.is_empty() {
            document.insert(table.qualified_name(), serde_json::Value::Object(entry));
        }
    }
    serde_json::Value::Object(document).to_string()
}

/// SQL that makes every tracked table notify the engine on change, so live queries are pushed
/// at once instead of waiting for the engine's periodic refresh. Engine-specific, so it lives
/// here and not in the migrations Hasura applies (Hasura polls on its own).
pub fn notify_triggers_sql(tables: &[TrackedTable]) -> String {
    let mut sql = String::from(
        "CREATE SCHEMA IF NOT EXISTS live_query_notify;\n\
         CREATE OR REPLACE FUNCTION live_query_notify.notify() RETURNS trigger LANGUAGE plpgsql AS $$\n\
         BEGIN\n\
           PERFORM pg_notify('postrust_' || TG_TABLE_SCHEMA || '_' || TG_TABLE_NAME,\n\
             json_build_object('operation', TG_OP, 'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME)::text);\n\
           RETURN NULL;\n\
         END $$;\n",
    );
    for table in tables {
        let TableName { schema, name } = &table.table;
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS live_query_notify ON {schema}.{name};\n\
             CREATE TRIGGER live_query_notify AFTER INSERT OR UPDATE OR DELETE ON {schema}.{name}\n\
               FOR EACH STATEMENT EXECUTE FUNCTION live_query_notify.notify();\n"
        ));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_tables() -> Vec<TrackedTable> {
        tracked_tables(&crate::repo_root().join("deploy/hasura/metadata")).expect("metadata parses")
    }

    #[test]
    fn the_shipped_metadata_tracks_every_table_the_services_use() {
        let names: Vec<_> = shipped_tables()
            .iter()
            .map(TrackedTable::qualified_name)
            .collect();
        for table in [
            "whist.instances",
            "whist.mandelboxes",
            "whist.images",
            "whist.assign_ledger",
            "config.regions",
            "config.settings",
            "config.desktop_app_version",
        ] {
            assert!(
                names.iter().any(|name| name == table),
                "{table} not tracked: {names:?}"
            );
        }
    }

    #[test]
    fn engine_names_carry_hasuras_relationship_and_custom_names() {
        let names: serde_json::Value =
            serde_json::from_str(&engine_names_json(&shipped_tables())).expect("json");
        assert_eq!(
            names["whist.instances"]["relationships"]["mandelboxes_instance_id_fkey"],
            "mandelboxes"
        );
        assert_eq!(
            names["whist.mandelboxes"]["relationships"]["mandelboxes_instance_id_fkey"],
            "instance"
        );
        assert_eq!(
            names["config.desktop_app_version"]["name"],
            "desktop_app_version"
        );
    }

    #[test]
    fn every_tracked_table_gets_a_notify_trigger() {
        let tables = shipped_tables();
        let sql = notify_triggers_sql(&tables);
        assert_eq!(sql.matches("CREATE TRIGGER").count(), tables.len());
    }
}
