//! The sea-orm entity of table `approval_envelopes`: the Python original's
//! schema column for column, so its databases open as they are.

use sea_orm::entity::prelude::*;

/// One row of `approval_envelopes`. JSON columns hold canonical JSON text;
/// instants are epoch seconds (`INTEGER`, read as `i64`).
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "approval_envelopes")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false, column_type = "Text")]
    pub envelope_id: String,
    #[sea_orm(unique, column_type = "Text")]
    pub nonce: String,
    #[sea_orm(column_type = "Text")]
    pub scope_json: String,
    #[sea_orm(column_type = "Text")]
    pub tool_calls_json: String,
    #[sea_orm(column_type = "Text")]
    pub plan_hash: String,
    #[sea_orm(column_type = "Text")]
    pub key_id: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub signed_object_json: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub signature_hex: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub state: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub consumed_at: Option<i64>,
}

impl ActiveModelBehavior for ActiveModel {}
