//! The session id as a path parameter: the one declaration of the
//! `{id}` rule that every `/api/sessions/{id}...` route takes, in the spec
//! (its `pattern`) and at runtime (parsed into the domain's [`SessionId`]).

use poem::{Request, RequestBody};
use poem_openapi::error::ParseParamError;
use poem_openapi::registry::{MetaParamIn, MetaSchemaRef};
use poem_openapi::validation::Pattern;
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use super::dto::{SESSION_ID_PATTERN, pattern_schema};
use crate::domain::session::SessionId;

/// The parameter's name in the routes and the spec. poem-openapi hands a
/// path extractor a positional name (`param0`), not this one.
const NAME: &str = "id";

/// A `{id}` path parameter that is a valid [`SessionId`].
///
/// Named `Path` because poem-openapi recognises path extractors by a type
/// segment called `Path` (and only then binds them to the route's `{id}`).
/// An extractor rather than a `Type` for `poem_openapi::param::Path`,
/// because a `Type`'s parse error is prefixed with its type name: this way
/// a malformed id gets the 400 `detail` clients got when the rule was a
/// validator on each route.
pub struct Path(pub SessionId);

impl<'a> ApiExtractor<'a> for Path {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::Parameter];
    const PARAM_IS_REQUIRED: bool = true;
    type ParamType = ();
    type ParamRawType = ();

    fn param_in() -> Option<MetaParamIn> {
        Some(MetaParamIn::Path)
    }

    fn param_schema_ref() -> Option<MetaSchemaRef> {
        Some(pattern_schema(SESSION_ID_PATTERN, false))
    }

    async fn from_request(
        request: &'a Request,
        _body: &mut RequestBody,
        options: ExtractParamOptions<()>,
    ) -> poem::Result<Self> {
        request
            .raw_path_param(options.name)
            .and_then(|raw| SessionId::parse(raw).ok())
            .map(Self)
            .ok_or_else(|| {
                ParseParamError {
                    name: NAME,
                    reason: format!("verification failed. {}", Pattern::new(SESSION_ID_PATTERN)),
                }
                .into()
            })
    }
}
