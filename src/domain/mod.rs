//! Validated domain types: pings, fences, campaigns, ids. Parsed once at the edge; nothing past
//! the edge re-checks them. Every validation error carries the JSON path of the bad value.

pub mod campaign;
pub mod error;
pub mod geo;
pub mod ids;
pub mod ping;
pub mod schedule;

pub use campaign::{Campaign, CampaignDoc, Caps, CouponTemplate, Fence, Merchant, Status, Trigger};
pub use error::{parse_json, FieldError, InputError};
pub use geo::{haversine_m, Circle, LatLon, Polygon, Shape, EARTH_RADIUS_M};
pub use ids::{CampaignId, CouponId, DeviceId, FenceId, UserId};
pub use ping::{Ping, PingClock, PingInput};
pub use schedule::Schedule;
