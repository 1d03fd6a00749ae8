#!/.dtbuild-toolbox/bin/busybox sh
# groupadd and useradd of run_as_root's toolbox (plugins/builtin/toolbox.py links both
# names to this file): shadow's commands for images that have none, written in POSIX sh
# over the toolbox's busybox, which has neither them nor addgroup/adduser. They edit
# /etc/group, /etc/passwd and, where they exist, /etc/gshadow and /etc/shadow (the files
# SHADOW_SETUP makes) as shadow's tools do, with the subset of options docs/root-layers.md
# lists; anything else is refused, never ignored silently. Exit codes are shadow's.
set -f
case $0 in */*) BB="${0%/*}/busybox" ;; *) BB=busybox ;; esac
PROG=${0##*/}
ROOT=""

die() { code=$1; shift; echo "$PROG: $*" >&2; exit "$code"; }
warn() { echo "$PROG: $*" >&2; }

# field FILE NAME N: field N of the entry NAME of a colon-separated file.
field() { "$BB" awk -F: -v n="$2" -v f="$3" '$1 == n { print $f; exit }' "$1"; }
# has_id FILE ID: whether an entry of FILE has the numeric id ID (field 3).
has_id() { "$BB" awk -F: -v id="$2" '$3 == id { found = 1 } END { exit !found }' "$1"; }
has_name() { "$BB" awk -F: -v n="$2" '$1 == n { found = 1 } END { exit !found }' "$1"; }

# next_id FILE SYSTEM: a free id as shadow picks it: for system accounts the highest free
# one in 100-999, for others one more than the highest in 1000-60000 (at least 1000).
next_id() {
  if [ "$2" = yes ]; then
    "$BB" awk -F: '{ used[$3] = 1 } END { for (i = 999; i >= 100; i--) if (!(i in used)) { print i; exit } }' "$1"
  else
    "$BB" awk -F: 'BEGIN { max = 999 } $3 >= 1000 && $3 <= 60000 && $3 > max { max = $3 } END { print max + 1 }' "$1"
  fi
}

is_number() { case $1 in ''|*[!0-9]*) return 1 ;; esac; return 0; }

check_name() {
  case $1 in
    ''|-*|\$*|*[!A-Za-z0-9._\$-]*|*\$?*) die 3 "invalid $2 name '$1'" ;;
  esac
  is_number "$1" && die 3 "invalid $2 name '$1' (a name must not be a number)"
  [ ${#1} -le 32 ] || die 3 "invalid $2 name '$1' (at most 32 characters)"
}

# need_file PATH: the account database must exist (SHADOW_SETUP makes it).
need_file() {
  [ -f "$1" ] || die 10 "cannot open ${1#"$ROOT"}: it does not exist (run SHADOW_SETUP first, or create it)"
}

# append FILE LINE: add a line, after a newline if the file lacks its last one.
append() {
  if [ -s "$1" ] && [ -n "$("$BB" tail -c 1 "$1")" ]; then echo >> "$1"; fi
  printf '%s\n' "$2" >> "$1" || die 10 "cannot write ${1#"$ROOT"}"
}

# add_member FILE GROUP USER FIELD: add USER to the member list (field FIELD) of GROUP,
# keeping the file's owner and mode (its inode is rewritten in place).
add_member() {
  tmp="$1.dtbuild-tmp"
  "$BB" awk -F: -v OFS=: -v g="$2" -v u="$3" -v f="$4" '
    $1 == g { n = split($f, m, ","); seen = 0
              for (i = 1; i <= n; i++) if (m[i] == u) seen = 1
              if (!seen) $f = ($f == "" ? u : $f "," u) }
    { print }' "$1" > "$tmp" || die 10 "cannot update ${1#"$ROOT"}"
  cat "$tmp" > "$1" && "$BB" rm -f "$tmp" || die 10 "cannot update ${1#"$ROOT"}"
}

# parse VALUED KNOWN ARGS...: OPT_x=value (or yes) for each option x of KNOWN (those of
# VALUED take a value); the other arguments in ARGS. Bundled short flags (-mU), -u1000 and
# --uid=1000 work; an option not in KNOWN is an error.
parse() {
  takes_value=$1; known=$2; shift 2
  ARGS=""
  while [ $# -gt 0 ]; do
    case $1 in
      --) shift; for a in "$@"; do ARGS="$ARGS $a"; done; break ;;
      --*=*) a=${1%%=*}; b=${1#*=}; shift; set -- "$a" "$b" "$@"; continue ;;
      -) ARGS="$ARGS $1"; shift; continue ;;
      --*) opt=$1 ;;
      -?) opt=$1 ;;
      -*) letter=${1#-}; letter=${letter%"${letter#?}"}; rest=${1#-?}
          case " $takes_value " in
            *" -$letter "*) shift; set -- "-$letter" "$rest" "$@" ;;
            *) shift; set -- "-$letter" "-$rest" "$@" ;;
          esac
          continue ;;
      *) ARGS="$ARGS $1"; shift; continue ;;
    esac
    case " $known " in
      *" $opt "*) ;;
      *) die 2 "unsupported option '$opt' (the toolbox's $PROG accepts $known)" ;;
    esac
    name=$(echo "${opt#-}" | "$BB" sed 's/^-//; s/-/_/g')
    case " $takes_value " in
      *" $opt "*) [ $# -ge 2 ] || die 2 "option '$opt' requires an argument"
                  eval "OPT_$name=\$2"; shift 2 ;;
      *) eval "OPT_$name=yes"; shift ;;
    esac
  done
}

# Long options are folded into their short names.
fold() {
  for pair in "$@"; do
    long=${pair%%=*}; short=${pair#*=}
    eval "v=\${OPT_$long-}"
    [ -n "$v" ] && eval "OPT_$short=\$v"
  done
}

root_option() {
  ROOT=${OPT_R:-}
  [ -z "$ROOT" ] || [ -d "$ROOT" ] || die 10 "the root directory '$ROOT' does not exist"
  case $ROOT in */) ROOT=${ROOT%/} ;; esac
  PASSWD="$ROOT/etc/passwd"; SHADOW="$ROOT/etc/shadow"; GROUP="$ROOT/etc/group"; GSHADOW="$ROOT/etc/gshadow"
}

# add_group NAME GID: write the group (and its gshadow entry where that file exists).
add_group() {
  append "$GROUP" "$1:x:$2:$3"
  [ -f "$GSHADOW" ] && append "$GSHADOW" "$1:!::$3"
  return 0
}

groupadd_main() {
  parse "-g --gid -R --root -U --users" \
        "-g --gid -r --system -f --force -o --non-unique -R --root -U --users" "$@"
  fold gid=g system=r force=f non_unique=o root=R users=U
  set -- $ARGS
  [ $# -eq 1 ] || die 2 "usage: groupadd [-g GID] [-r] [-f] [-o] [-U USERS] [-R ROOT] NAME"
  root_option
  group=$1
  check_name "$group" group
  need_file "$GROUP"
  if has_name "$GROUP" "$group"; then
    [ -n "${OPT_f:-}" ] && exit 0
    die 9 "group '$group' already exists"
  fi
  gid=${OPT_g:-}
  if [ -n "$gid" ]; then
    is_number "$gid" || die 3 "invalid group ID '$gid'"
    if has_id "$GROUP" "$gid" && [ -z "${OPT_o:-}" ]; then
      [ -n "${OPT_f:-}" ] || die 4 "GID '$gid' already exists"
      gid=""  # as shadow's -f: another id
    fi
  fi
  [ -n "$gid" ] || gid=$(next_id "$GROUP" "${OPT_r:-no}")
  [ -n "$gid" ] || die 4 "no free group ID"
  add_group "$group" "$gid" "${OPT_U:-}"
}

# home_mode: HOME_MODE of login.defs, else 0777 less its UMASK, else 0755.
home_mode() {
  defs="$ROOT/etc/login.defs"
  mode=""; umask_value=""
  if [ -f "$defs" ]; then
    mode=$("$BB" awk '$1 == "HOME_MODE" { print $2 }' "$defs")
    umask_value=$("$BB" awk '$1 == "UMASK" { print $2 }' "$defs")
  fi
  if [ -z "$mode" ] && [ -n "$umask_value" ]; then
    mode=$(printf '%o' $(( 0777 & ~0$umask_value )))
  fi
  echo "${mode:-755}"
}

useradd_main() {
  parse "-u --uid -g --gid -G --groups -d --home-dir -s --shell -c --comment -k --skel -R --root -p --password -b --base-dir" \
        "-u --uid -g --gid -G --groups -d --home-dir -s --shell -c --comment -k --skel -R --root -p --password -b --base-dir -m --create-home -M --no-create-home -r --system -U --user-group -N --no-user-group -o --non-unique -l --no-log-init" "$@"
  fold uid=u gid=g groups=G home_dir=d shell=s comment=c skel=k root=R password=p base_dir=b create_home=m \
       no_create_home=M system=r user_group=U no_user_group=N non_unique=o
  set -- $ARGS
  [ $# -eq 1 ] || die 2 "usage: useradd [-u UID] [-g GROUP] [-G GROUP,...] [-m|-M] [-d HOME] [-s SHELL] [-c COMMENT] [-r] [-U|-N] [-R ROOT] NAME"
  root_option
  user=$1
  check_name "$user" user
  need_file "$PASSWD"
  need_file "$GROUP"
  has_name "$PASSWD" "$user" && die 9 "user '$user' already exists"
  [ -n "${OPT_U:-}" ] && [ -n "${OPT_N:-}" ] && die 2 "options -U and -N conflict"
  [ -n "${OPT_U:-}" ] && [ -n "${OPT_g:-}" ] && die 2 "options -U and -g conflict"
  system=${OPT_r:-no}

  uid=${OPT_u:-}
  if [ -n "$uid" ]; then
    is_number "$uid" || die 3 "invalid user ID '$uid'"
    has_id "$PASSWD" "$uid" && [ -z "${OPT_o:-}" ] && die 4 "UID $uid is not unique"
  else
    uid=$(next_id "$PASSWD" "$system")
    [ -n "$uid" ] || die 4 "no free user ID"
  fi

  new_group=""
  if [ -n "${OPT_g:-}" ]; then
    if is_number "$OPT_g"; then
      has_id "$GROUP" "$OPT_g" || die 6 "group '$OPT_g' does not exist"
      gid=$OPT_g
    else
      has_name "$GROUP" "$OPT_g" || die 6 "group '$OPT_g' does not exist"
      gid=$(field "$GROUP" "$OPT_g" 3)
    fi
  elif [ -n "${OPT_N:-}" ]; then
    gid=100
  else  # a group of the user's name (Debian's USERGROUPS_ENAB yes)
    has_name "$GROUP" "$user" && die 9 "group $user exists - if you want to add this user to that group, use -g."
    if has_id "$GROUP" "$uid"; then gid=$(next_id "$GROUP" "$system"); else gid=$uid; fi
    new_group=yes
  fi

  supplementary=""
  if [ -n "${OPT_G:-}" ]; then
    for g in $(echo "$OPT_G" | "$BB" tr ',' ' '); do
      if is_number "$g"; then
        name=$("$BB" awk -F: -v id="$g" '$3 == id { print $1; exit }' "$GROUP")
        [ -n "$name" ] || die 6 "group '$g' does not exist"
        g=$name
      fi
      has_name "$GROUP" "$g" || die 6 "group '$g' does not exist"
      supplementary="$supplementary $g"
    done
  fi

  home=${OPT_d:-${OPT_b:-/home}/$user}
  shell=${OPT_s:-}
  if [ -z "$shell" ] && [ -f "$ROOT/etc/default/useradd" ]; then
    shell=$("$BB" awk -F= '$1 == "SHELL" { print $2 }' "$ROOT/etc/default/useradd")
  fi
  shell=${shell:-/bin/sh}
  case ${OPT_c:-}$home$shell${OPT_p:-} in *:*) die 3 "a comment, home, shell or password must not hold ':'" ;; esac

  [ -n "$new_group" ] && add_group "$user" "$gid" ""
  # The password (-p, a hash; none: locked) goes to /etc/shadow, or to /etc/passwd without one.
  if [ -f "$SHADOW" ]; then
    append "$PASSWD" "$user:x:$uid:$gid:${OPT_c:-}:$home:$shell"
    # No last-change day: SOURCE_DATE_EPOCH=1 is day 0, which shadow, too, writes as empty
    # (aging off) rather than "change the password at the next login".
    append "$SHADOW" "$user:${OPT_p:-!}:::::::"
  else
    append "$PASSWD" "$user:${OPT_p:-!}:$uid:$gid:${OPT_c:-}:$home:$shell"
  fi
  for g in $supplementary; do
    add_member "$GROUP" "$g" "$user" 4
    [ -f "$GSHADOW" ] && has_name "$GSHADOW" "$g" && add_member "$GSHADOW" "$g" "$user" 4
  done

  if [ -n "${OPT_m:-}" ] && [ -z "${OPT_M:-}" ]; then
    target="$ROOT$home"
    if [ -e "$target" ]; then
      warn "warning: the home directory $home already exists. Not copying any file from skel directory into it."
    else
      "$BB" mkdir -p "${target%/*}" && "$BB" mkdir "$target" || die 12 "cannot create directory $home"
      skel="$ROOT${OPT_k:-/etc/skel}"
      if [ -d "$skel" ]; then "$BB" cp -a "$skel/." "$target/" || die 12 "cannot copy $skel into $home"; fi
      "$BB" chown -R "$uid:$gid" "$target" && "$BB" chmod "$(home_mode)" "$target" \
        || die 12 "cannot set the owner of $home"
    fi
  fi
}

case $PROG in
  groupadd) groupadd_main "$@" ;;
  useradd) useradd_main "$@" ;;
  *) die 2 "run as groupadd or useradd (a link to this file), not as $PROG" ;;
esac
