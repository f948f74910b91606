//! `ipam …`: repairs of the address space.

use std::process::ExitCode;

use spiderpool_store::objects;
use spiderpool_store::Store;

use crate::args::Ipam;

pub(crate) async fn run(store: &dyn Store, cmd: Ipam) -> anyhow::Result<ExitCode> {
    match cmd {
        Ipam::Release { pool, ip } => {
            let h = objects::release_unrecorded(store, &pool, ip).await?;
            println!(
                "released {ip} of spiderippool/{pool} (held by pod {}, container {}, interface {}, without an endpoint record)",
                h.pod, h.container_id, h.nic
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
