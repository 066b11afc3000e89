/*
 * edge_acl: a Mosquitto 2.0 plugin (API v5) for what the acl_file cannot say about device identities.
 *
 * Mosquitto's acl_file checks topics only: it grants every SUBSCRIBE (so a device could join the
 * hub's shared subscriptions, "$share/hub/..."), and it has no notion of the retain flag or of the
 * payload size. This plugin runs before the acl_file (plugin callbacks are asked first; the first
 * answer other than "defer" wins) and refuses, for every identity that is not privileged:
 *
 *   - any identity that is not a well-formed device id ([a-z0-9][a-z0-9._-]{0,63}) or is a reserved
 *     name (hub, operator, ca, broker: broker roles and certificate file names);
 *   - any action of a device whose MQTT client id is not its certificate CN;
 *   - SUBSCRIBE to anything but its downlink: edge/v1/repo/meta/..., edge/v1/devices/<id>/blobs,
 *     edge/v1/devices/<id>/audit/ack, .../events/ack (so no "$share/...", no wildcard over devices,
 *     no uplink topic);
 *   - PUBLISH with the retain flag (also the Last Will: Mosquitto checks it when it sends it);
 *   - PUBLISH to anything but its uplink (edge/v1/repo/blobs/get, edge/v1/devices/<id>/{state,status,
 *     audit,events}) or with a payload above that topic's cap.
 *
 *   - anything at all of a revoked device: the CNs listed in plugin_opt_revoked_file (one a line,
 *     written by `edge-hub device revoke`); the list is re-read on SIGHUP and connected clients
 *     with such a CN are disconnected then (the CRL only refuses new TLS handshakes).
 *
 * Everything it does not refuse is deferred to the acl_file, which stays the one readable topic ACL
 * (so each rule is enforced twice for devices). Privileged identities (hub, operator by default) are
 * always deferred.
 *
 * Options (mosquitto.conf):
 *   plugin_opt_privileged  hub,operator   comma-separated CNs this plugin leaves to the acl_file
 *   plugin_opt_max_state   262144         payload caps in bytes per uplink topic
 *   plugin_opt_max_status  1024
 *   plugin_opt_max_events  16384
 *   plugin_opt_max_audit   8388608
 *   plugin_opt_max_request 4096           edge/v1/repo/blobs/get
 *   plugin_opt_revoked_file PATH          revoked device CNs (a missing file is an empty list)
 *
 * Build: cc -shared -fPIC -O2 -Wall -Wextra -o edge_acl.so edge_acl.c (Debian: mosquitto-dev,
 * libmosquitto-dev); mosquitto/build-plugin.sh does this.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define PREFIX "edge/v1/"
#define MAX_ID 64

static mosquitto_plugin_id_t *plugin_id = NULL;

static char privileged[512] = "hub,operator";

static struct {
	const char *leaf; /* topic after edge/v1/devices/<id>/ */
	const char *option;
	unsigned long cap;
} uplink[] = {
	{"state", "max_state", 262144UL},
	{"status", "max_status", 1024UL},
	{"events", "max_events", 16384UL},
	{"audit", "max_audit", 8388608UL},
};
static unsigned long max_request = 4096UL;

static const char *reserved[] = {"hub", "operator", "ca", "broker", NULL};

#define REVOKED_MAX (1 << 20)
static char revoked_path[4096] = "";
static char *revoked = NULL; /* the file's content: names separated by newlines, NUL-terminated */

static bool is_revoked(const char *user)
{
	if(!revoked) return false;
	size_t n = strlen(user);
	const char *p = revoked;
	while(*p){
		const char *end = strchr(p, '\n');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		if(len == n && strncmp(p, user, n) == 0) return true;
		if(!end) break;
		p = end + 1;
	}
	return false;
}

/* Re-read the revoked list; with kick, disconnect every client whose CN is on it. */
static void load_revoked(bool kick)
{
	if(!revoked_path[0]) return;
	FILE *fh = fopen(revoked_path, "r");
	char *fresh = calloc(1, REVOKED_MAX + 1);
	if(!fresh){
		if(fh) fclose(fh);
		return;
	}
	if(fh){
		size_t got = fread(fresh, 1, REVOKED_MAX, fh);
		fresh[got] = '\0';
		fclose(fh);
	}
	free(revoked);
	revoked = fresh;
	if(!kick) return;
	const char *p = revoked;
	char name[MAX_ID + 1];
	while(*p){
		const char *end = strchr(p, '\n');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		if(len > 0 && len <= MAX_ID){
			memcpy(name, p, len);
			name[len] = '\0';
			mosquitto_kick_client_by_username(name, false);
		}
		if(!end) break;
		p = end + 1;
	}
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	load_revoked(true);
	return MOSQ_ERR_PLUGIN_DEFER;
}

static bool in_list(const char *list, const char *name)
{
	size_t n = strlen(name);
	const char *p = list;
	while(*p){
		const char *end = strchr(p, ',');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		if(len == n && strncmp(p, name, n) == 0) return true;
		if(!end) break;
		p = end + 1;
	}
	return false;
}

static bool valid_device_id(const char *id)
{
	size_t n = strlen(id);
	if(n == 0 || n > MAX_ID) return false;
	for(size_t i = 0; i < n; i++){
		char c = id[i];
		bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && (c == '.' || c == '_' || c == '-'));
		if(!ok) return false;
	}
	for(int i = 0; reserved[i]; i++){
		if(strcmp(id, reserved[i]) == 0) return false;
	}
	return true;
}

/* "edge/v1/devices/<id>/" + leaf, or NULL when topic is not under the device's own prefix. */
static const char *own_leaf(const char *topic, const char *id)
{
	static const char devices[] = PREFIX "devices/";
	size_t dl = sizeof(devices) - 1, il = strlen(id);
	if(strncmp(topic, devices, dl) != 0) return NULL;
	if(strncmp(topic + dl, id, il) != 0 || topic[dl + il] != '/') return NULL;
	return topic + dl + il + 1;
}

static bool may_subscribe(const char *id, const char *filter)
{
	static const char meta[] = PREFIX "repo/meta/";
	if(strncmp(filter, meta, sizeof(meta) - 1) == 0) return true;
	const char *leaf = own_leaf(filter, id);
	return leaf && (strcmp(leaf, "blobs") == 0 || strcmp(leaf, "audit/ack") == 0 || strcmp(leaf, "events/ack") == 0);
}

/* The payload cap of an uplink topic, or -1 when the device may not publish there. */
static long publish_cap(const char *id, const char *topic)
{
	if(strcmp(topic, PREFIX "repo/blobs/get") == 0) return (long)max_request;
	const char *leaf = own_leaf(topic, id);
	if(!leaf) return -1;
	for(size_t i = 0; i < sizeof(uplink) / sizeof(uplink[0]); i++){
		if(strcmp(leaf, uplink[i].leaf) == 0) return (long)uplink[i].cap;
	}
	return -1;
}

static int deny(const char *user, const char *what, const char *topic)
{
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "edge_acl: denied %s %s for %s", what, topic ? topic : "", user ? user : "(none)");
	return MOSQ_ERR_ACL_DENIED;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	(void)event;
	(void)userdata;

	const char *user = mosquitto_client_username(ed->client);
	if(!user) return deny(user, "anonymous", ed->topic);
	if(in_list(privileged, user)) return MOSQ_ERR_PLUGIN_DEFER;
	if(!valid_device_id(user)) return deny(user, "invalid device id", ed->topic);
	if(is_revoked(user)) return deny(user, "revoked device", ed->topic);
	const char *cid = mosquitto_client_id(ed->client);
	if(!cid || strcmp(cid, user) != 0) return deny(user, "client id other than the CN", ed->topic);

	switch(ed->access){
		case MOSQ_ACL_SUBSCRIBE:
			return may_subscribe(user, ed->topic) ? MOSQ_ERR_PLUGIN_DEFER : deny(user, "subscribe", ed->topic);
		case MOSQ_ACL_WRITE: {
			if(ed->retain) return deny(user, "retained publish", ed->topic);
			long cap = publish_cap(user, ed->topic);
			if(cap < 0) return deny(user, "publish", ed->topic);
			if((unsigned long)ed->payloadlen > (unsigned long)cap) return deny(user, "oversized publish", ed->topic);
			return MOSQ_ERR_PLUGIN_DEFER;
		}
		default: /* READ (deliveries) and UNSUBSCRIBE: the acl_file decides */
			return MOSQ_ERR_PLUGIN_DEFER;
	}
}

static int read_options(struct mosquitto_opt *options, int option_count)
{
	for(int i = 0; i < option_count; i++){
		const char *k = options[i].key, *v = options[i].value;
		if(strcmp(k, "privileged") == 0){
			if(strlen(v) >= sizeof(privileged)) return MOSQ_ERR_INVAL;
			snprintf(privileged, sizeof(privileged), "%s", v);
			continue;
		}
		if(strcmp(k, "revoked_file") == 0){
			if(strlen(v) >= sizeof(revoked_path)) return MOSQ_ERR_INVAL;
			snprintf(revoked_path, sizeof(revoked_path), "%s", v);
			continue;
		}
		char *end = NULL;
		unsigned long n = strtoul(v, &end, 10);
		if(!end || *end != '\0' || n == 0){
			mosquitto_log_printf(MOSQ_LOG_ERR, "edge_acl: option %s must be a positive integer", k);
			return MOSQ_ERR_INVAL;
		}
		bool known = false;
		if(strcmp(k, "max_request") == 0){
			max_request = n;
			known = true;
		}
		for(size_t j = 0; j < sizeof(uplink) / sizeof(uplink[0]); j++){
			if(strcmp(k, uplink[j].option) == 0){
				uplink[j].cap = n;
				known = true;
			}
		}
		if(!known){
			mosquitto_log_printf(MOSQ_LOG_ERR, "edge_acl: unknown option %s", k);
			return MOSQ_ERR_INVAL;
		}
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **user_data, struct mosquitto_opt *options, int option_count)
{
	(void)user_data;
	plugin_id = identifier;
	int rc = read_options(options, option_count);
	if(rc != MOSQ_ERR_SUCCESS) return rc;
	mosquitto_log_printf(MOSQ_LOG_INFO, "edge_acl: loaded (privileged: %s)", privileged);
	load_revoked(false);
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL);
	if(rc != MOSQ_ERR_SUCCESS) return rc;
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *user_data, struct mosquitto_opt *options, int option_count)
{
	(void)user_data;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	free(revoked);
	revoked = NULL;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
}
