//! Lists the objects of a PKCS#11 token, one JSON object a line (class,
//! label, hex ID and the protection flags of private keys), for the
//! end-to-end tests to check what the server keeps in its token. Run as a
//! separate process so that SoftHSM2 reads the test's `SOFTHSM2_CONF`.
//!
//! Usage: `pkcs11-objects MODULE TOKEN_LABEL PIN`; exits 1 with a message
//! on stderr when the token cannot be opened.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde_json::json;

fn run(module: &str, label: &str, pin: &str) -> Result<(), String> {
    let err = |e: cryptoki::error::Error| e.to_string();
    let ctx = Pkcs11::new(module).map_err(err)?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(err)?;
    let slot = ctx
        .get_slots_with_token()
        .map_err(err)?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label() == label))
        .ok_or_else(|| format!("no token labelled {label:?}"))?;
    let session = ctx.open_ro_session(slot).map_err(err)?;
    session
        .login(UserType::User, Some(&AuthPin::new(pin.into())))
        .map_err(err)?;
    for h in session.find_objects(&[]).map_err(err)? {
        let attrs = session
            .get_attributes(
                h,
                &[
                    AttributeType::Class,
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                ],
            )
            .map_err(err)?;
        let mut o = serde_json::Map::new();
        for a in attrs {
            let (k, v) = match a {
                Attribute::Class(c) => (
                    "class",
                    json!(match c {
                        ObjectClass::PRIVATE_KEY => "private_key".to_string(),
                        ObjectClass::PUBLIC_KEY => "public_key".to_string(),
                        other => format!("{other:?}"),
                    }),
                ),
                Attribute::Label(l) => ("label", json!(String::from_utf8_lossy(&l))),
                Attribute::Id(id) => ("id", json!(hex::encode(id))),
                Attribute::Token(b) => ("token", json!(b)),
                Attribute::Sensitive(b) => ("sensitive", json!(b)),
                Attribute::Extractable(b) => ("extractable", json!(b)),
                Attribute::NeverExtractable(b) => ("never_extractable", json!(b)),
                _ => continue,
            };
            o.insert(k.into(), v);
        }
        println!("{}", serde_json::Value::Object(o));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [module, label, pin] = args.as_slice() else {
        eprintln!("usage: pkcs11-objects MODULE TOKEN_LABEL PIN");
        return std::process::ExitCode::from(2);
    };
    match run(module, label, pin) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pkcs11-objects: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
