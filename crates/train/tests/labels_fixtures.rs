//! Label masking per template against the fixtures' reference labels (exact).

use kollava_inputs::template::Role;
use kollava_inputs::Tokenizer;
use kollava_testkit::{checkpoint_dir, Reference, CHECKPOINTS};
use kollava_train::labels::{preprocess, preprocess_rendered, reference_template};

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn labels_match_reference_for_every_template() {
    for name in CHECKPOINTS {
        let r = Reference::load(name);
        let dir = checkpoint_dir(name);
        let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &Default::default()).unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let scheme = ckpt.image_tokens(&tok).unwrap();
        for (tpl, entry) in r.get("train_labels").as_object().unwrap() {
            let (t, rule) = reference_template(tpl, name == "llava-mpt").unwrap();
            let ex = match entry["turns"].as_array() {
                Some(turns) => {
                    let turns: Vec<(Role, String)> = turns
                        .iter()
                        .map(|t| {
                            (
                                if t[0] == 0 {
                                    Role::User
                                } else {
                                    Role::Assistant
                                },
                                t[1].as_str().unwrap().to_string(),
                            )
                        })
                        .collect();
                    preprocess(&tok, &scheme, &t, rule, &turns).unwrap()
                }
                None => {
                    preprocess_rendered(&tok, &scheme, &t, rule, entry["text"].as_str().unwrap())
                        .unwrap()
                }
            };
            assert_eq!(ex.ids, ids(&entry["ids"]), "{name} {tpl} ids");
            assert_eq!(
                ex.labels,
                ids(&entry["labels"]),
                "{name} {tpl} labels (mismatch flag {})",
                ex.mismatch
            );
            assert_eq!(
                ex.mismatch,
                entry["tokenization_mismatch"].as_bool().unwrap_or(false),
                "{name} {tpl}"
            );
        }
    }
}
