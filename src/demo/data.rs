//! The real data the demo is built from, shipped in `data/`: merchants from the Foursquare Open
//! Source Places sample and polygon outlines (Tsinghua campus, Beijing municipality).

use std::path::Path;

use anyhow::Context;

use crate::domain::LatLon;

/// One open venue from the places sample.
#[derive(Debug, Clone)]
pub struct Place {
    /// Foursquare place id.
    pub id: String,
    /// Venue name.
    pub name: String,
    /// Where it is.
    pub at: LatLon,
    /// Top-level Foursquare category, e.g. "Dining and Drinking" (empty when uncategorised).
    pub category: String,
}

#[derive(serde::Deserialize)]
struct PlaceRow {
    fsq_place_id: String,
    name: String,
    latitude: Option<f64>,
    longitude: Option<f64>,
    date_closed: Option<String>,
    fsq_category_labels: String,
}

/// Reads the open venues with coordinates from the places CSV.
pub fn load_places(path: &Path) -> anyhow::Result<Vec<Place>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let mut places = Vec::new();
    for row in reader.deserialize::<PlaceRow>() {
        let row = row.with_context(|| format!("parsing {}", path.display()))?;
        let (Some(lat), Some(lon)) = (row.latitude, row.longitude) else { continue };
        if row.date_closed.as_deref().is_some_and(|d| !d.is_empty()) {
            continue;
        }
        let Some(at) = LatLon::new(lat, lon) else { continue };
        // "[Retail > Fashion Retail > Clothing Store, …]" → "Retail"
        let category = row.fsq_category_labels.trim_matches(['[', ']']).split(" > ").next().unwrap_or("").to_owned();
        places.push(Place { id: row.fsq_place_id, name: row.name, at, category });
    }
    Ok(places)
}

/// The polygon rings (GeoJSON `[lon, lat]`, outer ring first) of every polygon in a GeoJSON
/// FeatureCollection of Polygon / MultiPolygon features.
pub fn load_polygons(path: &Path) -> anyhow::Result<Vec<Vec<Vec<[f64; 2]>>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut polygons = Vec::new();
    for feature in doc["features"].as_array().into_iter().flatten() {
        let geometry = &feature["geometry"];
        let coords = &geometry["coordinates"];
        match geometry["type"].as_str() {
            Some("Polygon") => polygons.push(serde_json::from_value(coords.clone())?),
            Some("MultiPolygon") => {
                let many: Vec<Vec<Vec<[f64; 2]>>> = serde_json::from_value(coords.clone())?;
                polygons.extend(many);
            }
            _ => {}
        }
    }
    Ok(polygons)
}
