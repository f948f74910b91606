//! A pool changed or deleted with the CLI while an agent claims one of its addresses: whichever
//! commits second must see the other. The interloper below commits a claim exactly between the
//! CLI's checks of the pool's holders and its own commit, the window no timing can hit reliably.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use spiderpool_api::manifest::parse_documents;
use spiderpool_control::apply::{apply, delete, ApplyError};
use spiderpool_store::memory::MemoryStore;
use spiderpool_store::{Allocation, Changes, Holder, Kind, Op, Result, Revision, Store, Stored};

/// A memory store that, once armed with an address of pool `p`, claims it for another pod just
/// before committing the next transaction it is given.
struct Interloper {
    inner: MemoryStore,
    claim: Mutex<Option<IpAddr>>,
}

#[async_trait]
impl Store for Interloper {
    async fn get(&self, kind: Kind, key: &str) -> Result<Option<Stored>> {
        self.inner.get(kind, key).await
    }
    async fn list(&self, kind: Kind) -> Result<Vec<Stored>> {
        self.inner.list(kind).await
    }
    async fn allocations(&self, pool: &str) -> Result<Vec<Allocation>> {
        self.inner.allocations(pool).await
    }
    async fn allocation_counts(&self) -> Result<BTreeMap<String, u64>> {
        self.inner.allocation_counts().await
    }
    async fn commit(&self, ops: Vec<Op>) -> Result<Revision> {
        let claim = self.claim.lock().unwrap().take();
        if let Some(ip) = claim {
            let pool = self.inner.get(Kind::IPPool, "p").await?.unwrap().revision;
            self.inner
                .commit(vec![Op::Claim {
                    pool: "p".into(),
                    ip,
                    holder: Holder {
                        pod: "default/late-pod".into(),
                        container_id: "late".into(),
                        nic: "eth0".into(),
                        ..Default::default()
                    },
                    pool_revision: pool,
                }])
                .await?;
        }
        self.inner.commit(ops).await
    }
    async fn revision(&self) -> Result<Option<Revision>> {
        self.inner.revision().await
    }
    async fn ping(&self) -> Result<()> {
        Ok(())
    }
    async fn watch(&self, after: Revision, kinds: &[Kind]) -> Result<Option<Changes>> {
        self.inner.watch(after, kinds).await
    }
}

const POOL: &str = "apiVersion: spiderpool.spidernet.io/v2beta1\nkind: SpiderIPPool\nmetadata: {name: p}\nspec:\n  subnet: 10.6.0.0/16\n  ips: [10.6.0.10-10.6.0.19]\n";

async fn store_with_pool() -> Interloper {
    let s = Interloper {
        inner: MemoryStore::new(),
        claim: Mutex::new(None),
    };
    let pool = parse_documents(POOL).unwrap().remove(0).object;
    apply(&s, pool).await.unwrap();
    s
}

fn ip(a: &str) -> IpAddr {
    a.parse().unwrap()
}

#[tokio::test]
async fn excluding_an_address_claimed_meanwhile_is_refused() {
    let s = store_with_pool().await;
    *s.claim.lock().unwrap() = Some(ip("10.6.0.11"));
    let change = parse_documents(&format!("{POOL}  excludeIPs: [10.6.0.11]\n"))
        .unwrap()
        .remove(0)
        .object;
    let err = apply(&s, change).await.unwrap_err();
    assert!(matches!(err, ApplyError::Invalid(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("10.6.0.11") && msg.contains("default/late-pod"),
        "{msg}"
    );
    let stored = s.get(Kind::IPPool, "p").await.unwrap().unwrap().value;
    assert!(stored["spec"].get("excludeIPs").is_none(), "{stored}");
    assert_eq!(s.held_ips("p").await.unwrap(), [ip("10.6.0.11")]);
}

#[tokio::test]
async fn deleting_a_pool_claimed_from_meanwhile_is_refused() {
    let s = store_with_pool().await;
    *s.claim.lock().unwrap() = Some(ip("10.6.0.10"));
    let err = delete(&s, Kind::IPPool, "p").await.unwrap_err().to_string();
    assert!(
        err.contains("addresses of pool p were claimed after revision"),
        "{err}"
    );
    assert!(s.get(Kind::IPPool, "p").await.unwrap().is_some());
    // Asked again, the CLI names the holder.
    let err = delete(&s, Kind::IPPool, "p").await.unwrap_err().to_string();
    assert!(err.contains("held by default/late-pod"), "{err}");
}
