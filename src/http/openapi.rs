//! `/openapi.json`: the OpenAPI 3.1 description of the API, generated from the handlers'
//! `#[utoipa::path]` annotations so it cannot drift from the routes silently (a test checks that
//! every route is in it).

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{campaigns, coupons, error, ops, pings, pushes, schemas, users};

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "kabao", description = "Geofence-driven coupon engine: location pings in, coupons out."),
    paths(
        campaigns::create, campaigns::list, campaigns::get_one, campaigns::replace, campaigns::delete,
        campaigns::stats,
        pings::ingest,
        users::put_device, users::delete_device, users::erase_user, users::wallet,
        coupons::redeem,
        pushes::dead_letters,
        ops::healthz, ops::readyz, ops::metrics, serve,
    ),
    components(schemas(
        error::ErrorBody, error::ErrorObject, campaigns::CampaignPage, campaigns::StatsReply, campaigns::PushCounts,
        pings::PingsReply, pings::Rejected, pings::Ignored, pings::Event, pings::CouponTexts,
        users::DeviceInput, users::WalletItem, users::Wallet, coupons::RedeemInput,
        pushes::DeadLetters, pushes::DeadLetterItem,
        schemas::PingsRequest, schemas::PingRequest, schemas::PingBatch, schemas::CampaignRequest,
    )),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// Declares the `bearer` scheme the operations refer to (admin token or client JWT).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token, or a client JWT (HS256, `sub` = user id, `exp` checked)"))
                    .build(),
            ),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
