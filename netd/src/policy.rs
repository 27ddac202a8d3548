//! The cluster's network policy in the store, and the control API's policy
//! routes (get, put, check).
//!
//! The document is weft-model's [`Policy`], JSON at
//! [`Keys::policy_doc`](weft_model::Keys::policy_doc); the rules and the one
//! decision are the model's. Here: [`load`] (what the enforcement reads,
//! also at start), [`decode`] (for a watched value), [`store`] (validated,
//! compare-and-swap on the document's revision so two writers cannot lose
//! each other's change), and the daemon's API handlers. The CLI's document
//! editing (`netd policy set`, file formats) is [`edit`].

pub mod edit;

use weft_api::{ApiError, ErrorKind, PolicyCheck, PolicyDoc, PolicyVerdict, PutPolicy};
use weft_model::{Keys, Policy, PolicyError};
use weft_store::{CasOutcome, Expect, Revision, Store, StoreError};

use crate::daemon::Daemon;
use crate::endpoints::store_error;

/// What can go wrong reading or writing the policy document.
#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the policy document at {key} does not parse: {source}; replace it with `netd policy apply FILE`"
    )]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the policy is not valid: {0}")]
    Invalid(#[from] PolicyError),
    #[error(
        "the policy changed meanwhile (expected revision {expected}, the store has {}): read it \
         again and reapply the change",
        current.map_or("none".to_owned(), |r| r.to_string())
    )]
    Conflict {
        expected: Revision,
        current: Option<Revision>,
    },
}

impl From<PolicyStoreError> for ApiError {
    fn from(e: PolicyStoreError) -> ApiError {
        match e {
            PolicyStoreError::Store(e) => store_error(e),
            e @ PolicyStoreError::Invalid(_) => {
                ApiError::new(ErrorKind::InvalidRequest, e.to_string())
            }
            e @ PolicyStoreError::Conflict { .. } => {
                ApiError::new(ErrorKind::Conflict, e.to_string())
            }
            e @ PolicyStoreError::Corrupt { .. } => {
                ApiError::new(ErrorKind::Internal, e.to_string())
            }
        }
    }
}

/// A stored document (the value at `key`), parsed and validated.
pub fn decode(key: &str, value: &[u8]) -> Result<Policy, PolicyStoreError> {
    let policy: Policy =
        serde_json::from_slice(value).map_err(|source| PolicyStoreError::Corrupt {
            key: key.to_owned(),
            source,
        })?;
    policy.validate()?;
    Ok(policy)
}

/// The stored policy and the revision of its last write; `None` when no
/// document is stored ([`Policy::default`] applies: allow everything).
pub async fn load(
    store: &dyn Store,
    keys: &Keys,
) -> Result<Option<(Policy, Revision)>, PolicyStoreError> {
    let key = keys.policy_doc();
    match store.get(&key).await? {
        None => Ok(None),
        Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
    }
}

/// Validates and writes `policy`. With `expect` (`Some(0)`: none stored),
/// only if the stored document is still at that revision; without, it
/// replaces whatever is stored (still by compare-and-swap on what it read,
/// retried, so a concurrent writer's document is replaced whole, never
/// mixed). Returns the revision of the write.
pub async fn store(
    store: &dyn Store,
    keys: &Keys,
    policy: &Policy,
    expect: Option<Revision>,
) -> Result<Revision, PolicyStoreError> {
    policy.validate()?;
    let key = keys.policy_doc();
    let value = serde_json::to_vec(policy).map_err(|source| PolicyStoreError::Corrupt {
        key: key.clone(),
        source,
    })?;
    let as_expect = |r: Revision| {
        if r == 0 {
            Expect::Absent
        } else {
            Expect::ModRevision(r)
        }
    };
    if let Some(expected) = expect {
        return match store
            .compare_and_swap(&key, as_expect(expected), &value, None)
            .await?
        {
            CasOutcome::Done(rev) => Ok(rev),
            CasOutcome::Conflict(now) => Err(PolicyStoreError::Conflict {
                expected,
                current: now.map(|kv| kv.mod_revision),
            }),
        };
    }
    let mut current = store.get(&key).await?.map_or(0, |kv| kv.mod_revision);
    // Each conflict means another write landed: bounded, as writers are
    // operators, not loops.
    for _ in 0..16 {
        match store
            .compare_and_swap(&key, as_expect(current), &value, None)
            .await?
        {
            CasOutcome::Done(rev) => return Ok(rev),
            CasOutcome::Conflict(now) => current = now.map_or(0, |kv| kv.mod_revision),
        }
    }
    Err(PolicyStoreError::Conflict {
        expected: current,
        current: None,
    })
}

/// What `check` decides, with the revision of the document that decided.
pub fn check(policy: &Policy, revision: Option<Revision>, req: &PolicyCheck) -> PolicyVerdict {
    let l4 = req.port.map(|p| (p.proto, p.port));
    let decision = policy.decide(&req.from, &req.to, l4);
    PolicyVerdict {
        explanation: decision.to_string(),
        decision,
        revision,
    }
}

impl Daemon {
    /// `GET /v1/policy`.
    pub async fn get_policy(&self) -> Result<PolicyDoc, ApiError> {
        let loaded = load(self.store().as_ref(), &self.config().keys).await;
        let loaded = self.note_policy(loaded)?;
        Ok(match loaded {
            Some((policy, rev)) => PolicyDoc {
                policy,
                revision: Some(rev),
            },
            None => PolicyDoc {
                policy: Policy::default(),
                revision: None,
            },
        })
    }

    /// `PUT /v1/policy`.
    pub async fn put_policy(&self, req: PutPolicy) -> Result<PolicyDoc, ApiError> {
        let written = store(
            self.store().as_ref(),
            &self.config().keys,
            &req.policy,
            req.expect_revision,
        )
        .await;
        let rev = self.note_policy(written)?;
        tracing::info!(revision = rev, "policy replaced through the control API");
        Ok(PolicyDoc {
            policy: req.policy,
            revision: Some(rev),
        })
    }

    /// `POST /v1/policy/check`: with the given document, else the stored one.
    pub async fn check_policy(&self, req: PolicyCheck) -> Result<PolicyVerdict, ApiError> {
        if let Some(policy) = &req.policy {
            policy.validate().map_err(PolicyStoreError::from)?;
            return Ok(check(policy, None, &req));
        }
        let doc = self.get_policy().await?;
        Ok(check(&doc.policy, doc.revision, &req))
    }

    /// Reports the store's part of a policy outcome to the health tracker
    /// (an invalid document never reached the store).
    fn note_policy<T>(&self, r: Result<T, PolicyStoreError>) -> Result<T, ApiError> {
        match &r {
            Err(PolicyStoreError::Store(e)) => self.health().failed(e.is_transient(), e),
            Err(PolicyStoreError::Invalid(_)) => {}
            _ => self.health().answered(),
        }
        r.map_err(ApiError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_model::Action;
    use weft_store::testing::TestStore;

    fn deny_all() -> Policy {
        Policy {
            default: Action::Deny,
            ..Policy::default()
        }
    }

    #[tokio::test]
    async fn store_and_load_with_compare_and_swap() {
        let ts = TestStore::sqlite().await;
        let store = ts.store();
        let keys = Keys::new("/t");
        assert!(load(&*store, &keys).await.unwrap().is_none());

        // Expecting "none stored" works once.
        let r1 = super::store(&*store, &keys, &deny_all(), Some(0))
            .await
            .unwrap();
        let (p, rev) = load(&*store, &keys).await.unwrap().unwrap();
        assert_eq!((p, rev), (deny_all(), r1));
        let err = super::store(&*store, &keys, &Policy::default(), Some(0))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PolicyStoreError::Conflict { expected: 0, current: Some(r) } if r == r1),
            "{err}"
        );

        // A stale revision loses; the current one wins; no expectation
        // replaces whatever is there.
        let r2 = super::store(&*store, &keys, &Policy::default(), Some(r1))
            .await
            .unwrap();
        let err = super::store(&*store, &keys, &deny_all(), Some(r1))
            .await
            .unwrap_err();
        assert_eq!(ApiError::from(err).kind, ErrorKind::Conflict);
        let r3 = super::store(&*store, &keys, &deny_all(), None)
            .await
            .unwrap();
        assert!(r3 > r2);
        assert_eq!(
            load(&*store, &keys).await.unwrap().unwrap(),
            (deny_all(), r3)
        );
    }

    #[tokio::test]
    async fn invalid_documents_are_refused_and_reported() {
        let ts = TestStore::sqlite().await;
        let store = ts.store();
        let keys = Keys::default();
        let mut bad = Policy::default();
        bad.stacks.insert(
            "shop".into(),
            weft_model::StackPolicy {
                linked: vec!["nowhere".into()],
                ..Default::default()
            },
        );
        let err = super::store(&*store, &keys, &bad, None).await.unwrap_err();
        let api = ApiError::from(err);
        assert_eq!(api.kind, ErrorKind::InvalidRequest);
        assert!(api.message.contains("\"nowhere\""), "{}", api.message);
        assert!(store.get(&keys.policy_doc()).await.unwrap().is_none());

        // Written behind weft's back: load says what is wrong.
        store
            .put(&keys.policy_doc(), b"{\"default\":1}", None)
            .await
            .unwrap();
        let err = load(&*store, &keys).await.unwrap_err();
        assert!(err.to_string().contains("does not parse"), "{err}");
        let json = serde_json::to_vec(&bad).unwrap();
        store.put(&keys.policy_doc(), &json, None).await.unwrap();
        let err = load(&*store, &keys).await.unwrap_err();
        assert!(matches!(err, PolicyStoreError::Invalid(_)), "{err}");
    }

    #[test]
    fn check_explains_with_the_revision() {
        let req = PolicyCheck {
            from: "a/x".parse().unwrap(),
            to: "b".parse().unwrap(),
            port: Some("tcp/80".parse().unwrap()),
            policy: None,
        };
        let v = check(&deny_all(), Some(7), &req);
        assert_eq!(v.decision.action, Action::Deny);
        assert_eq!(v.revision, Some(7));
        assert_eq!(v.explanation, v.decision.to_string());
    }
}
