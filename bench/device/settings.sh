# Sourced by tp_ab.sh and ab_pair.sh. export_settings "VAR=VALUE[,VAR=VALUE...]": export each
# pair into the calling (sub)shell; an empty string exports nothing (the defaults).
export_settings() {
    local kv x
    IFS=, read -r -a kv <<< "$1"
    for x in "${kv[@]}"; do [ -n "$x" ] && export "${x?}"; done
    return 0
}
