//! `relayctl capture add|list|rm`: capture rules (what the data planes record in full).

use anyhow::{anyhow, Result};
use relay_proto::v1::{AddCaptureRuleRequest, CaptureRuleInfo, DeleteCaptureRuleRequest, ListCaptureRulesRequest};

use super::{version_string, Deleted};
use crate::args::CaptureCmd;
use crate::client::{Conn, RpcResult};
use crate::output::{Column, Output, Value};

pub async fn run(conn: &mut Conn, out: Output, cmd: CaptureCmd) -> Result<()> {
    match cmd {
        CaptureCmd::Create(a) => {
            // The API reads 0 as "not given" (the default): an explicit 0 would silently become
            // 100%, 256 KiB or "with the request log", so it is refused here.
            if a.sample.is_some_and(|s| s == 0.0) {
                return Err(anyhow!(
                    "--sample 0 would record nothing: give a share above 0 (0.01 = one in a hundred), or remove the rule"
                ));
            }
            if a.max_bytes == Some(0) {
                return Err(anyhow!(
                    "--max-bytes must be at least 1 (leave it out for the default, 256KiB)"
                ));
            }
            if a.ttl == Some(0) {
                return Err(anyhow!(
                    "--ttl must be longer than 0 (leave it out to keep captures as long as the request log)"
                ));
            }
            let info = conn
                .api
                .add_capture_rule(AddCaptureRuleRequest {
                    key: a.key.unwrap_or_default(),
                    group: a.group.unwrap_or_default(),
                    account: a.account.unwrap_or_default(),
                    model: a.model.unwrap_or_default(),
                    errors_only: a.errors_only,
                    sample_rate: a.sample.unwrap_or(0.0),
                    max_bytes: a.max_bytes.unwrap_or(0),
                    ttl_ms: a.ttl.unwrap_or(0),
                })
                .await
                .or_report(&conn.server)?;
            out.one(COLUMNS, &info)
        }
        CaptureCmd::List => {
            let list = conn
                .api
                .list_capture_rules(ListCaptureRulesRequest {})
                .await
                .or_report(&conn.server)?;
            out.list(COLUMNS, &list.rules)
        }
        CaptureCmd::Rm { id } => {
            let resp = conn
                .api
                .delete_capture_rule(DeleteCaptureRuleRequest { id: id.clone() })
                .await
                .or_report(&conn.server)?;
            Deleted {
                kind: "capture_rule",
                target: id,
                version: resp.version,
            }
            .print(out, "removed")
        }
    }
}

fn any(s: &str) -> Value {
    if s.is_empty() {
        Value::text("any")
    } else {
        Value::text(s)
    }
}

const COLUMNS: &[Column<CaptureRuleInfo>] = &[
    Column::new("id", "ID", |r| {
        Value::Id(r.rule.as_ref().map(|x| x.id.clone()).unwrap_or_default())
    }),
    Column::new("key", "Key", |r| any(&r.key)),
    Column::new("group", "Group", |r| any(&r.group)),
    Column::new("account", "Account", |r| any(&r.account)),
    Column::new("model", "Model", |r| {
        any(r.rule.as_ref().map_or("", |x| x.model.as_str()))
    }),
    Column::new("errors_only", "Errors only", |r| {
        Value::Bool(r.rule.as_ref().is_some_and(|x| x.errors_only))
    }),
    Column::new("sample", "Sample", |r| {
        Value::Decimal(format!("{}", r.rule.as_ref().map_or(0.0, |x| x.sample_rate)))
    }),
    Column::new("max_bytes", "Max bytes", |r| {
        Value::UInt(r.rule.as_ref().map_or(0, |x| x.max_bytes))
    }),
    Column::new("ttl_ms", "TTL ms", |r| {
        Value::UInt(r.rule.as_ref().map_or(0, |x| x.ttl_ms))
    }),
    Column::detail("config_version", "Config version", |r| {
        version_string(r.version.as_ref()).map_or(Value::Null, Value::Text)
    }),
];
