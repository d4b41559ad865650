//! Consul's JSON shapes, as documented for `/v1/health/service`, `/v1/catalog/services` and
//! `/v1/agent/service/*`. Unknown fields are ignored so newer Consul versions still parse.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One element of `/v1/health/service/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    pub node: Node,
    pub service: Service,
    #[serde(default)]
    pub checks: Vec<HealthCheck>,
}

impl ServiceEntry {
    /// Whether every check of the instance (its node's `serfHealth` too) passes: only then
    /// may it get traffic; `warning` counts as not passing.
    pub fn is_passing(&self) -> bool {
        self.checks.iter().all(|c| c.status == "passing")
    }

    /// The address to send traffic to: `Service.Address`, or the node's when it is empty.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    pub node: String,
    #[serde(default)]
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Service {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: HashMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub status: String,
    #[serde(default)]
    pub service_name: String,
    /// The time a Docker-health TTL check's output carries ([`crate::stamp`]).
    #[serde(
        default,
        rename = "Output",
        deserialize_with = "crate::stamp::in_text",
        skip_serializing
    )]
    pub output_at: Option<u64>,
    /// The time a maintenance check's notes carry ([`crate::stamp`]).
    #[serde(
        default,
        rename = "Notes",
        deserialize_with = "crate::stamp::in_text",
        skip_serializing
    )]
    pub notes_at: Option<u64>,
}

/// One check as `/v1/health/state/any` lists it: enough to tell which service a change of
/// check state touched. `ModifyIndex` moves when the status or the output changes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CheckState {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// Empty for a node's own checks (`serfHealth`, maintenance).
    #[serde(default)]
    pub service_name: String,
    /// The instance's ID, empty for a node's own checks.
    #[serde(default, rename = "ServiceID")]
    pub service_id: String,
    pub status: String,
    /// The index of the write that registered it: a check registered with its instance has
    /// the catalog's index of that registration.
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// The status a TTL check is set to, and the `Status` a new check may start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Passing,
    Warning,
    Critical,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }
}

/// Body of `PUT /v1/agent/service/register`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    pub port: u16,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub meta: HashMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckRegistration>,
}

/// One check in a registration. Exactly one of `http`, `tcp` or `ttl` is set.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CheckRegistration {
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Left unset, a new check starts critical: that is what keeps new instances out of
    /// rotation until they prove healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<CheckStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_before_passing: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures_before_critical: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// One value of `GET /v1/agent/services`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub meta: HashMap<String, String>,
}

/// One value of `GET /v1/agent/checks`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentCheck {
    /// The agent's node name in the catalog: where its checks are listed
    /// (`/v1/health/node/<node>`).
    #[serde(default)]
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub status: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
}

/// Consul writes `null` for empty lists and maps in several endpoints.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_health_entry_with_nulls_and_node_address_fallback() {
        let raw = r#"[{"Node":{"Node":"n1","Address":"10.0.0.9","Extra":1},
            "Service":{"ID":"web-1","Service":"web","Tags":null,"Address":"","Port":8080,"Meta":null},
            "Checks":[{"CheckID":"serfHealth","Status":"passing"}]}]"#;
        let entries: Vec<ServiceEntry> = serde_json::from_str(raw).unwrap();
        assert_eq!(entries[0].address(), "10.0.0.9");
        assert!(entries[0].service.tags.is_empty());
        assert_eq!(entries[0].service.port, 8080);
    }

    #[test]
    fn registration_omits_unset_fields() {
        let reg = ServiceRegistration {
            id: "a".into(),
            name: "web".into(),
            port: 80,
            checks: vec![CheckRegistration {
                ttl: Some("10s".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_value(&reg).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"ID":"a","Name":"web","Port":80,"Checks":[{"TTL":"10s"}]})
        );
    }
}

/// One key of `GET /v1/kv/<prefix>?recurse`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KvPair {
    pub key: String,
    /// Base64, as Consul sends it; `None` for an empty value.
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub modify_index: u64,
}

impl KvPair {
    /// The value's bytes; `None` when it is not valid base64.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        decode_base64(self.value.as_deref().unwrap_or(""))
    }
}

/// Standard base64 with padding (RFC 4648 4), as Consul encodes KV values.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod kv_tests {
    use super::*;

    #[test]
    fn kv_values_decode() {
        let pair = |v: &str| KvPair {
            key: "k".into(),
            value: Some(v.into()),
            modify_index: 1,
        };
        assert_eq!(pair("eyJ2MSI6OTB9").bytes().unwrap(), br#"{"v1":90}"#);
        assert_eq!(pair("YQ==").bytes().unwrap(), b"a");
        assert_eq!(pair("YWI=").bytes().unwrap(), b"ab");
        assert_eq!(pair("").bytes().unwrap(), b"");
        assert!(pair("a b").bytes().is_none());
    }
}
