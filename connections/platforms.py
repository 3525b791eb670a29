"""Which profile platform each connection asset type publishes to (DESIGN "Asset type → platform").

An asset whose type is not here never backs a profile; the audit logs it and goes on.
"""

ASSET_TYPE_PLATFORM: dict[str, str] = {
    "page": "facebook",
    "instagram_account": "instagram",
    "threads_account": "threads",
    "youtube_channel": "youtube",
    "business_profile": "google_business",
    "linkedin_page": "linkedin",
    "twitter_account": "twitter",
    "tiktok_account": "tiktok",
    "snapchat_account": "snapchat",
}

PLATFORM_ASSET_TYPE: dict[str, str] = {platform: t for t, platform in ASSET_TYPE_PLATFORM.items()}


def platform_for_asset_type(asset_type: str) -> str | None:
    return ASSET_TYPE_PLATFORM.get(asset_type)
