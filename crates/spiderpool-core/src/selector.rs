//! Kubernetes label selectors (`matchLabels` plus `matchExpressions` with In, NotIn, Exists,
//! DoesNotExist), used by pool `nodeAffinity`, `namespaceAffinity` and `podAffinity`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Labels of a node, namespace or pod.
pub type Labels = BTreeMap<String, String>;

/// A `metav1.LabelSelector`. The empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Every pair must be present with this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Every requirement must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// Values for `In` and `NotIn`; empty for the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A selector that Kubernetes would reject.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// The operator is not one of the four.
    #[error("matchExpressions key {key:?}: unknown operator {operator:?} (valid: In, NotIn, Exists, DoesNotExist)")]
    UnknownOperator {
        /// The requirement's key.
        key: String,
        /// The bad operator.
        operator: String,
    },
    /// In/NotIn without values.
    #[error("matchExpressions key {key:?}: operator {operator} needs at least one value")]
    MissingValues {
        /// The requirement's key.
        key: String,
        /// The operator.
        operator: String,
    },
    /// Exists/DoesNotExist with values.
    #[error("matchExpressions key {key:?}: operator {operator} takes no values, got {values:?}")]
    UnexpectedValues {
        /// The requirement's key.
        key: String,
        /// The operator.
        operator: String,
        /// The values given.
        values: Vec<String>,
    },
}

impl LabelSelector {
    /// Checks the operators and their values.
    pub fn validate(&self) -> Result<(), SelectorError> {
        for r in &self.match_expressions {
            match r.operator.as_str() {
                "In" | "NotIn" if r.values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                    })
                }
                "Exists" | "DoesNotExist" if !r.values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                        values: r.values.clone(),
                    })
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                _ => {
                    return Err(SelectorError::UnknownOperator {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether `labels` satisfy the selector. An unknown operator never matches.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

impl fmt::Display for LabelSelector {
    /// The selector in `kubectl -l` syntax, e.g. `node-subnet in (subnet-6),zone`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator.as_str() {
                "In" => format!("{} in ({})", r.key, r.values.join(",")),
                "NotIn" => format!("{} notin ({})", r.key, r.values.join(",")),
                "Exists" => r.key.clone(),
                "DoesNotExist" => format!("!{}", r.key),
                op => format!("{} {op} ({})", r.key, r.values.join(",")),
            });
        }
        if parts.is_empty() {
            f.write_str("<everything>")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn expr(r: Requirement) -> LabelSelector {
        LabelSelector {
            match_expressions: vec![r],
            ..Default::default()
        }
    }

    #[test]
    fn matches_every_operator() {
        let node6 = labels(&[("node-subnet", "subnet-6"), ("zone", "a")]);
        let bare = labels(&[]);
        let cases: &[(LabelSelector, &Labels, bool)] = &[
            (LabelSelector::default(), &bare, true),
            (expr(req("node-subnet", "In", &["subnet-6"])), &node6, true),
            (expr(req("node-subnet", "In", &["subnet-7"])), &node6, false),
            (expr(req("node-subnet", "In", &["subnet-6"])), &bare, false),
            (
                expr(req("node-subnet", "NotIn", &["subnet-7"])),
                &node6,
                true,
            ),
            (
                expr(req("node-subnet", "NotIn", &["subnet-6"])),
                &node6,
                false,
            ),
            (
                expr(req("node-subnet", "NotIn", &["subnet-6"])),
                &bare,
                true,
            ),
            (expr(req("zone", "Exists", &[])), &node6, true),
            (expr(req("zone", "Exists", &[])), &bare, false),
            (expr(req("zone", "DoesNotExist", &[])), &node6, false),
            (expr(req("zone", "DoesNotExist", &[])), &bare, true),
            (expr(req("zone", "Gt", &["1"])), &node6, false),
            (
                LabelSelector {
                    match_labels: [("zone".to_string(), "a".to_string())].into(),
                    match_expressions: vec![req("node-subnet", "In", &["subnet-6", "subnet-7"])],
                },
                &node6,
                true,
            ),
            (
                LabelSelector {
                    match_labels: [("zone".to_string(), "b".to_string())].into(),
                    match_expressions: vec![req("node-subnet", "In", &["subnet-6"])],
                },
                &node6,
                false,
            ),
        ];
        for (sel, l, want) in cases {
            assert_eq!(sel.matches(l), *want, "{sel} on {l:?}");
        }
    }

    #[test]
    fn validation_names_the_bad_key() {
        let err = expr(req("zone", "Like", &["a"])).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "matchExpressions key \"zone\": unknown operator \"Like\" (valid: In, NotIn, Exists, DoesNotExist)"
        );
        let err = expr(req("zone", "In", &[])).validate().unwrap_err();
        assert!(
            err.to_string().contains("needs at least one value"),
            "{err}"
        );
        let err = expr(req("zone", "Exists", &["a"])).validate().unwrap_err();
        assert!(err.to_string().contains("takes no values"), "{err}");
        assert!(expr(req("zone", "NotIn", &["a"])).validate().is_ok());
    }

    #[test]
    fn displays_in_kubectl_syntax() {
        let s = LabelSelector {
            match_labels: [("a".to_string(), "1".to_string())].into(),
            match_expressions: vec![
                req("node-subnet", "In", &["subnet-6"]),
                req("x", "DoesNotExist", &[]),
            ],
        };
        assert_eq!(s.to_string(), "a=1,node-subnet in (subnet-6),!x");
    }
}
