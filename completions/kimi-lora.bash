_kimi_lora_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _KIMI_LORA_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _kimi_lora_completion kimi-lora
