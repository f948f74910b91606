//! The `spiderpool` binary: stdin and the environment in, the plugin's answer or CNI error JSON
//! out (see the library for the protocol).

use std::io::{Read, Write};
use std::process::ExitCode;

use spiderpool_api::cni::CniErrorJson;
use spiderpool_cni::{plugin, CniError};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // `std::env::vars` panics on a value that is not UTF-8; such a value is read lossily here
    // and then refused by the checks it fails (a container ID with U+FFFD in it, say).
    let env: std::collections::HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let outcome = match read {
        Ok(_) => plugin::run(&env, &stdin),
        Err(e) => Err((
            plugin::FALLBACK_VERSION.to_string(),
            CniError::new(
                spiderpool_api::cni::code::IO_FAILURE,
                format!("reading stdin: {e}"),
            ),
        )),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((version, e)) => {
            tracing::error!(code = e.code, error = %e.msg, "failed");
            let j = CniErrorJson {
                cni_version: version,
                code: e.code,
                msg: e.msg,
                details: String::new(),
            };
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(&j).expect("error serialises")
            );
            ExitCode::FAILURE
        }
    }
}
