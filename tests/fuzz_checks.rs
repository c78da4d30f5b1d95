//! The fuzz targets' checks (`kabao::fuzzing`) on a stable toolchain, without libFuzzer: every
//! file of `fuzz/corpus/<target>/` as it is, then seeded random mutations of them and random
//! bytes under proptest. Findings of fuzzing runs are kept here as regression inputs.

use std::path::Path;

use proptest::prelude::*;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 3] = [
    ("ping_body", kabao::fuzzing::ping_body),
    ("campaign_body", kabao::fuzzing::campaign_body),
    ("polygon_containment", kabao::fuzzing::polygon_containment),
];

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("a corpus").map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

#[test]
fn every_corpus_file_passes_its_check() {
    for (target, check) in TARGETS {
        let files = corpus(target);
        assert!(!files.is_empty(), "{target} has a corpus");
        for file in files {
            check(&file);
        }
    }
}

/// Applies `edits` (position, byte, kind: overwrite / insert / delete) to `seed`.
fn mutate(mut seed: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, byte, kind) in edits {
        let at = if seed.is_empty() { 0 } else { at % (seed.len() + 1) };
        match kind % 3 {
            0 if at < seed.len() => seed[at] = byte,
            1 => seed.insert(at, byte),
            _ if at < seed.len() => {
                seed.remove(at);
            }
            _ => seed.push(byte),
        }
    }
    seed
}

/// `default` cases, or `PROPTEST_CASES` for a longer run (`PROPTEST_CASES=20000 cargo test
/// --release --test fuzz_checks`), the stable toolchain's stand-in for a fuzzing session.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

/// A corpus file of `target` with a few random edits.
fn mutated(target: &str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    (0..seeds.len(), prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..12))
        .prop_map(move |(i, edits)| mutate(seeds[i].clone(), &edits))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(400)))]

    #[test]
    fn mutated_pings(bytes in mutated("ping_body")) {
        kabao::fuzzing::ping_body(&bytes);
    }

    #[test]
    fn mutated_campaigns(bytes in mutated("campaign_body")) {
        kabao::fuzzing::campaign_body(&bytes);
    }

}

proptest! {
    // Fewer: a star polygon of up to 700 vertices is checked at ~3 000 points, brute force each.
    #![proptest_config(ProptestConfig::with_cases(cases(48)))]

    #[test]
    fn mutated_polygons(bytes in mutated("polygon_containment")) {
        kabao::fuzzing::polygon_containment(&bytes);
    }

    #[test]
    fn random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for (_, check) in TARGETS {
            check(&bytes);
        }
    }
}
