//! `sigil-server bundle show|set|list|delete`: this trust domain's bundle
//! and the federated bundles.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use sigil_proto::admin::{
    GetBundleRequest, ListFederatedBundlesRequest, SetFederatedBundleRequest, TrustDomainId,
};
use sigil_proto::common::FederatedBundle;

use super::render;
use super::{AdminArgs, CliError, connect};

/// How a bundle is read or printed.
#[derive(Copy, Clone, ValueEnum, PartialEq, Eq)]
pub enum BundleFormat {
    /// PEM certificates (X.509 authorities only).
    Pem,
    /// A SPIFFE bundle document (JWKS with X.509 and JWT authorities).
    Spiffe,
}

/// `sigil-server bundle ...`.
#[derive(Subcommand)]
pub enum BundleCmd {
    /// Print this trust domain's bundle.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Set (create or replace) a federated trust domain's bundle.
    Set {
        #[command(flatten)]
        admin: AdminArgs,
        /// Trust domain ID, e.g. spiffe://other.org.
        #[arg(long)]
        id: String,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// File holding the bundle; `-` for standard input.
        #[arg(long)]
        path: PathBuf,
    },
    /// List federated bundles.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Delete a federated bundle.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// Trust domain ID, e.g. spiffe://other.org.
        #[arg(long)]
        id: String,
    },
}

/// The bundle file named by `--path` (`-` for standard input).
fn read_input(path: &PathBuf) -> Result<Vec<u8>, CliError> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| CliError::flag("--path -", e))?;
        Ok(buf)
    } else {
        std::fs::read(path).map_err(|e| CliError::Flag {
            flag: "--path",
            reason: format!("{}: {e}", path.display()),
        })
    }
}

/// Parses a bundle file in `format`.
fn parse_bundle(format: BundleFormat, data: Vec<u8>) -> Result<FederatedBundle, CliError> {
    Ok(match format {
        BundleFormat::Pem => {
            let text = String::from_utf8(data)
                .map_err(|_| CliError::flag("--path", "not a PEM text file"))?;
            FederatedBundle {
                x509_authorities: sigil_core::x509::pem_to_certs(&text)
                    .map_err(|e| CliError::flag("--path", e))?,
                jwt_bundle: vec![],
                sequence: 0,
            }
        }
        BundleFormat::Spiffe => {
            let p = sigil_core::bundle::parse_spiffe_bundle(&data)
                .map_err(|e| CliError::flag("--path", e))?;
            let jwt_bundle = if p.jwt_authorities.is_empty() {
                vec![]
            } else {
                sigil_core::jwt::jwks(&p.jwt_authorities)
            };
            FederatedBundle {
                x509_authorities: p.x509_authorities,
                jwt_bundle,
                sequence: p.sequence.unwrap_or(0),
            }
        }
    })
}

/// Prints one bundle in `format`.
fn print_bundle(
    format: BundleFormat,
    x509: &[Vec<u8>],
    jwks: &[u8],
    sequence: u64,
) -> Result<(), CliError> {
    let spiffe = format == BundleFormat::Spiffe;
    print!("{}", render::bundle_text(spiffe, x509, jwks, sequence)?);
    Ok(())
}

/// Runs `sigil-server bundle ...`.
pub async fn bundle(cmd: BundleCmd) -> Result<(), CliError> {
    match cmd {
        BundleCmd::Show { admin, format } => {
            let b = connect(&admin)
                .await?
                .get_bundle(GetBundleRequest {})
                .await?
                .into_inner();
            if format == BundleFormat::Spiffe && !b.wit_bundle.is_empty() {
                // The SPIFFE form also lists the WIT-SVID keys (`use: wit-svid`).
                let text =
                    render::bundle_text(true, &b.x509_authorities, &b.jwt_bundle, b.sequence)?;
                let mut doc: serde_json::Value = serde_json::from_str(&text)?;
                let wit: serde_json::Value = serde_json::from_slice(&b.wit_bundle)?;
                if let Some(keys) = wit.get("keys").and_then(serde_json::Value::as_array) {
                    sigil_core::bundle::add_wit_authorities(&mut doc, keys);
                }
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_bundle(format, &b.x509_authorities, &b.jwt_bundle, b.sequence)?;
            }
        }
        BundleCmd::Set {
            admin,
            id,
            format,
            path,
        } => {
            let bundle = parse_bundle(format, read_input(&path)?)?;
            connect(&admin)
                .await?
                .set_federated_bundle(SetFederatedBundleRequest {
                    trust_domain: id,
                    bundle: Some(bundle),
                })
                .await?;
            println!("bundle set.");
        }
        BundleCmd::List { admin, format } => {
            let r = connect(&admin)
                .await?
                .list_federated_bundles(ListFederatedBundlesRequest {})
                .await?
                .into_inner();
            let mut tds: Vec<_> = r.bundles.into_iter().collect();
            tds.sort_by(|a, b| a.0.cmp(&b.0));
            for (td, b) in tds {
                render::bundle_banner(&td);
                print_bundle(format, &b.x509_authorities, &b.jwt_bundle, b.sequence)?;
                println!();
            }
        }
        BundleCmd::Delete { admin, id } => {
            connect(&admin)
                .await?
                .delete_federated_bundle(TrustDomainId { trust_domain: id })
                .await?;
            println!("bundle deleted.");
        }
    }
    Ok(())
}
